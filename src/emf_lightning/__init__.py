"""emf-lightning: one-step text-to-image generation with MeanFlow and pluggable text encoders."""

__version__ = "0.1.0"
