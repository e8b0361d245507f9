"""Rotations fused into a model's weights before quantization: Hadamard math and QuaRot."""

from lowbit.rotation.hadamard import RandomHadamard, fwht, hadamard_multiply
from lowbit.rotation.quarot import rotate

__all__ = ["RandomHadamard", "fwht", "hadamard_multiply", "rotate"]
