"""Continual-learning strategies as Avalanche plugins, one module each, and their registry."""
