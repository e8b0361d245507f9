"""OCP Microscaling (MX v1.0): elements of a small float format sharing one E8M0 scale per block
of 32 along the last axis.

    shared_exp = clamp(floor(log2(block_amax)) - emax_elem, -127, 127)   (block_amax == 0: -127)
    elements   = round_to_format(x / 2**shared_exp, element_format)       (RNE, saturating)
    scale_e8m0 = shared_exp + 127 as uint8                                (0xFF: NaN)
    x_hat      = elements * 2**shared_exp

``block_amax`` (optional, shape (..., K // 32)) replaces each block's own max |x| in the shared-exponent
formula: a scale search (``lowbit.formats.scale_search``) chooses it. emax_elem is the exponent of the
element format's largest value (E2M1 2, E4M3 8, E5M2 15). A block holding NaN or +-inf gets scale 0xFF
(NaN), so it dequantizes to NaN, as the spec prescribes for a NaN scale.
"""

from __future__ import annotations

import torch

from ._common import as_float32, check_integer, floor_log2, pow2
from .blocks import blocks_for_scales, to_blocks
from .minifloat import FloatFormat, round_to_format

MX_BLOCK_SIZE = 32
E8M0_BIAS = 127
E8M0_NAN = 0xFF


def e8m0_to_float(scale_e8m0: torch.Tensor) -> torch.Tensor:
    """Float32 ``2**(u - 127)`` of uint8 E8M0 codes ``u``; 0xFF decodes to NaN (2**-127 is exact)."""
    check_integer(scale_e8m0, "scale_e8m0", torch.uint8)
    exponent = scale_e8m0.to(torch.int32) - E8M0_BIAS
    return torch.where(scale_e8m0 == E8M0_NAN, torch.nan, pow2(exponent))


def float_to_e8m0(exponent: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 code ``exponent + 127`` of integer-valued ``exponent`` clamped to [-127, 127].

    Float NaN exponents encode as 0xFF (NaN).
    """
    if not isinstance(exponent, torch.Tensor):
        raise TypeError(f"exponent must be a torch.Tensor, got {type(exponent).__name__}")
    exponent32 = exponent.float()
    code = torch.clamp(exponent32, -E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS
    return torch.where(torch.isnan(exponent32), float(E8M0_NAN), code).to(torch.uint8)


def _shared_exponent(block_amax: torch.Tensor, element_format: FloatFormat) -> torch.Tensor:
    exponent = torch.clamp(floor_log2(block_amax) - element_format.max_exponent, -E8M0_BIAS, E8M0_BIAS)
    exponent = torch.where(block_amax == 0, -float(E8M0_BIAS), exponent)
    return torch.where(torch.isfinite(block_amax), exponent, torch.nan)


def quantize_mx(
    x: torch.Tensor,
    element_format: FloatFormat,
    block_size: int = MX_BLOCK_SIZE,
    block_amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (..., K) to MX: returns ``(elements, scale_e8m0)``.

    ``elements``: float32 values on ``element_format``'s grid, same shape as ``x``.
    ``scale_e8m0``: uint8 biased shared exponents, shape (..., K // block_size).
    Raises ValueError when K is not divisible by ``block_size``.
    """
    blocks = to_blocks(as_float32(x, "x"), block_size)
    amax = blocks.abs().amax(dim=-1) if block_amax is None else as_float32(block_amax, "block_amax").reshape(
        blocks.shape[:-1])
    shared_exponent = _shared_exponent(amax, element_format)
    elements = round_to_format(blocks / pow2(shared_exponent).unsqueeze(-1), element_format)
    return elements.reshape(x.shape), float_to_e8m0(shared_exponent)


def dequantize_mx(
    elements: torch.Tensor,
    scale_e8m0: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``elements * 2**(scale_e8m0 - 127)`` per block of the last axis, as ``dtype``.

    The block size is ``elements.shape[-1] // scale_e8m0.shape[-1]``.
    """
    scale = e8m0_to_float(scale_e8m0)
    blocks = blocks_for_scales(as_float32(elements, "elements"), scale, "elements", "scale_e8m0")
    return (blocks * scale.unsqueeze(-1)).reshape(elements.shape).to(dtype)


def fake_quant_mx(
    x: torch.Tensor,
    element_format: FloatFormat,
    block_size: int = MX_BLOCK_SIZE,
    block_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize_mx(*quantize_mx(x, element_format, block_size, block_amax))`` in ``x``'s dtype."""
    return dequantize_mx(*quantize_mx(x, element_format, block_size, block_amax), dtype=x.dtype)
