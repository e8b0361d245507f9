"""NVFP4 (ModelOpt's definition): E2M1 elements in blocks of 16 along the last axis, an E4M3 scale
per block and a float32 scale per tensor.

    global_scale = global_amax / (6 * 448)                          (global_amax <= 2**-24: 1)
    block_scale  = e4m3(block_amax / (6 * global_scale))            (saturating; block_amax == 0: 1)
    codes        = e2m1(x / (block_scale * global_scale))           (RNE, saturating at +-6)
    x_hat        = decode_e2m1(codes) * block_scale * global_scale

``block_amax`` (optional, shape (..., K // 16)) replaces each block's own max |x| in the block-scale formula:
a scale search (``lowbit.formats.scale_search``) chooses it; elements beyond ``6 * block_scale *
global_scale`` saturate. A zero-amax block stores scale 1.0, as ModelOpt does. A block whose scale underflows E4M3 to 0
gets elements 0 (ModelOpt would divide by zero there).
"""

from __future__ import annotations

import torch

from ._common import TINY_AMAX, as_float32, as_float32_like, divide
from .blocks import blocks_for_scales, to_blocks
from .minifloat import E2M1, E4M3, decode_e2m1, encode_e2m1, round_to_format

NVFP4_BLOCK_SIZE = 16


def _global_scale(x32: torch.Tensor, global_amax: torch.Tensor | float | None) -> torch.Tensor:
    amax = x32.abs().amax() if global_amax is None else as_float32_like(global_amax, x32, "global_amax")
    return torch.where(amax <= TINY_AMAX, 1.0, divide(amax, E2M1.max_value * E4M3.max_value))


def _scale_and_round(
    x: torch.Tensor, global_amax: torch.Tensor | float | None, block_size: int,
    block_amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E2M1 values as float32 blocks (..., K // block_size, block_size), block scales, global scale)."""
    x32 = as_float32(x, "x")
    blocks = to_blocks(x32, block_size)
    global_scale = _global_scale(x32, global_amax)
    amax = blocks.abs().amax(dim=-1) if block_amax is None else as_float32(block_amax, "block_amax").reshape(
        blocks.shape[:-1])
    block_scale = round_to_format(torch.where(amax == 0, 1.0, amax / (E2M1.max_value * global_scale)), E4M3)
    divisor = (block_scale * global_scale).unsqueeze(-1)
    is_zero = divisor == 0
    scaled = torch.where(is_zero, 0.0, blocks / torch.where(is_zero, 1.0, divisor))
    return round_to_format(scaled, E2M1), block_scale, global_scale


def quantize_nvfp4(
    x: torch.Tensor,
    global_amax: torch.Tensor | float | None = None,
    block_size: int = NVFP4_BLOCK_SIZE,
    block_amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (..., K) to NVFP4: returns ``(codes, block_scale, global_scale)``.

    ``codes``: uint8 E2M1 codes 0..15, same shape as ``x`` (unpacked, one code per byte).
    ``block_scale``: float8_e4m3fn, shape (..., K // block_size).
    ``global_scale``: float32 scalar tensor (``global_amax`` defaults to ``x.abs().amax()``).
    Raises ValueError when K is not divisible by ``block_size``.
    """
    elements, block_scale, global_scale = _scale_and_round(x, global_amax, block_size, block_amax)
    codes = encode_e2m1(elements).reshape(x.shape)
    return codes, block_scale.to(torch.float8_e4m3fn), global_scale


def dequantize_nvfp4(
    codes: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``decode_e2m1(codes) * block_scale * global_scale`` per block of the last axis, as ``dtype``.

    The block size is ``codes.shape[-1] // block_scale.shape[-1]``.
    """
    scale32 = as_float32(block_scale, "block_scale")
    blocks = blocks_for_scales(decode_e2m1(codes), scale32, "codes", "block_scale")
    global32 = as_float32_like(global_scale, blocks, "global_scale")
    return (blocks * (scale32 * global32).unsqueeze(-1)).reshape(codes.shape).to(dtype)


def fake_quant_nvfp4(
    x: torch.Tensor,
    global_amax: torch.Tensor | float | None = None,
    block_size: int = NVFP4_BLOCK_SIZE,
    block_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize_nvfp4(*quantize_nvfp4(x, global_amax, block_size, block_amax))`` in ``x``'s dtype.

    Computed without the round trip through codes (same values; a NaN in a block makes the whole
    block NaN either way).
    """
    elements, block_scale, global_scale = _scale_and_round(x, global_amax, block_size, block_amax)
    return (elements * (block_scale * global_scale).unsqueeze(-1)).reshape(x.shape).to(x.dtype)
