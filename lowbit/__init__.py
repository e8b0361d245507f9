"""lowbit: post-training quantization and weight compression for PyTorch models."""

__version__ = "0.1.0"
