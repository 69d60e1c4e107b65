"""The shared trainer, model, modalities, feature cache, losses, metrics and results."""
