"""comodal: continual multimodal learning on streams of modality-pair tasks."""

__version__ = "0.1.0"
