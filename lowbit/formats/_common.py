"""Helpers shared by the format modules: input checks, float32 upcast, exact powers of two."""

from __future__ import annotations

import torch

# ModelOpt treats amax <= 2**-24 (the smallest fp16 subnormal) as zero: the scale becomes 1.
TINY_AMAX = 2.0**-24


def check_floating(value: torch.Tensor, name: str) -> None:
    """Raise TypeError unless ``value`` is a floating-point tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def check_integer(value: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> None:
    """Raise TypeError unless ``value`` is an integer tensor (of ``dtype`` when given)."""
    is_integer = isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex()
    if not is_integer or (dtype is not None and value.dtype != dtype):
        wanted = dtype or "an integer dtype"
        got = getattr(value, "dtype", type(value).__name__)
        raise TypeError(f"{name} must be a tensor of {wanted}, got {got}")


def as_float32(value: torch.Tensor, name: str) -> torch.Tensor:
    """Check that ``value`` is a floating tensor and return it as float32 (no copy when already float32)."""
    check_floating(value, name)
    return value.float()


def as_float32_like(value: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float32 tensor on ``like``'s device from a floating tensor or a Python number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    return as_float32(value, name).to(like.device)


def check_block_size(block_size: int) -> None:
    """Raise ValueError unless ``block_size`` is a positive int."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def divide(numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> torch.Tensor:
    """IEEE float32 ``numerator / denominator`` with identical results on CPU and CUDA.

    A Python number is first made a 0-d tensor on the other operand's device: PyTorch's CUDA kernel
    multiplies by the reciprocal of a Python-number divisor, and ``number / tensor`` is computed as
    ``tensor.reciprocal() * number`` everywhere; both can differ from true division by an ulp.
    """
    if not isinstance(numerator, torch.Tensor):
        numerator = denominator.new_full((), numerator)
    if not isinstance(denominator, torch.Tensor):
        denominator = numerator.new_full((), denominator)
    return torch.div(numerator, denominator)


def scale_and_step(amax: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, step)`` of a symmetric grid whose largest code ``bound`` maps onto float32 ``amax`` (any shape):

        step  = amax / bound     codes are formed as round(x / step)
        scale = bound / amax     lowbit's dequantization divides by it: x_hat = codes / scale

    both correctly rounded (``divide``), 1 where ``amax <= 2**-24``. ``step`` is the divisor exported checkpoints
    store (``weight_scale``, ``input_scale``), and ``x / step`` is how their writers and readers form codes
    (ModelOpt's exporter, compressed-tensors, ONNX QuantizeLinear): ``x * scale`` differs from it by one float32
    rounding, which on bf16 data often decides a rounding midpoint the other way.
    """
    is_tiny = amax <= TINY_AMAX
    safe = torch.where(is_tiny, 1.0, amax)
    return torch.where(is_tiny, 1.0, divide(bound, safe)), torch.where(is_tiny, 1.0, divide(safe, bound))


def _pow2_normal(exponent: torch.Tensor) -> torch.Tensor:
    """2**e as float32 from its bit pattern, for int32 ``e`` in [-126, 127]."""
    return ((exponent + 127) << 23).view(torch.float32)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2**exponent in float32 for integer-valued ``exponent`` in [-149, 127], exact on every device.

    Built from bit patterns, not exp2 (whose CUDA version is not guaranteed exact); exponents below
    -126 (float32 subnormals) are the exact product of two normal powers of two.
    """
    exponent = exponent.to(torch.int32)
    normal_part = torch.clamp(exponent, min=-126)
    return _pow2_normal(normal_part) * _pow2_normal(exponent - normal_part)


def floor_log2(magnitude: torch.Tensor) -> torch.Tensor:
    """floor(log2(m)) for finite m > 0, exact (from frexp, not log2), as float32.

    For m == 0 this gives -1 (frexp's exponent 0, minus one); callers clamp it to their minimum.
    """
    _, exponent = torch.frexp(magnitude)
    return (exponent - 1).float()
