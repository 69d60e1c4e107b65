"""What the platform and the scenarios both build on: datasets, batches and loaders, atomic
file writes and source digests (so neither imports the other's internals)."""
