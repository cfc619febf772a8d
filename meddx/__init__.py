"""meddx: multimodal medical diagnosis on a foundation model."""

__version__ = "0.1.0"
