"""Rotations fused into a model's weights before quantization: Hadamard math, QuaRot and SpinQuant."""

from lowbit.rotation.hadamard import RandomHadamard, fwht, hadamard_multiply
from lowbit.rotation.quarot import rotate
from lowbit.rotation.spinquant import spinquant

__all__ = ["RandomHadamard", "fwht", "hadamard_multiply", "rotate", "spinquant"]
