"""NF4 (4-bit NormalFloat, Dettmers et al. 2023, "QLoRA"): 16 levels at normal quantiles in [-1, 1].

A codebook format (``codebook.py``: code = nearest level of x / amax, a tie takes the lower level, as NNCF's
searchsorted on the midpoints; x_hat = level * amax). Quantizers use it with ``codebook="nf4"`` over an int4
block view; ``compress_weights`` does for ``CompressWeightsMode.NF4``.
"""

from __future__ import annotations

import torch

from lowbit.formats.codebook import dequantize_codebook, fake_quant_codebook, quantize_codebook, register_codebook

NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
register_codebook("nf4", NF4_VALUES)


def quantize_nf4(x: torch.Tensor, amax: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes (uint8 0..15, same shape as ``x``) and the float32 scale (``amax``, tiny -> 1)."""
    return quantize_codebook(x, amax, "nf4")


def dequantize_nf4(codes: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32):
    """``NF4_VALUES[codes] * scale`` in float32, returned as ``dtype``."""
    return dequantize_codebook(codes, scale, "nf4", dtype)


def fake_quant_nf4(x: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    """``dequantize_nf4(*quantize_nf4(x, amax))`` in ``x``'s dtype."""
    return fake_quant_codebook(x, amax, "nf4")
