"""Codebook formats: each element rounds to the nearest of a fixed table of levels in [-1, 1], times its amax.

    normalized = x / amax                                  (amax = max |x| of the group; <= 2**-24: 1)
    code       = index of the level nearest to normalized  (a value exactly halfway between two levels takes
                                                             the lower one: searchsorted on the midpoints)
    x_hat      = levels[code] * amax

Inputs beyond ``[-amax, amax]`` saturate to the first / last level. A codebook is a name and its levels
(``register_codebook``, one line beside the table: ``nf4.py``); a quantizer uses one with the attribute
``codebook=<name>`` over an integer ``num_bits`` block view (``2**num_bits >= len(levels)``), which gives the
granularity and the max calibration of ``amax``. Codes are uint8, levels and scales float32.
"""

from __future__ import annotations

import torch

from lowbit.formats._common import TINY_AMAX, as_float32, as_float32_like, check_integer

CODEBOOKS: dict[str, tuple[float, ...]] = {}


def register_codebook(name: str, levels: tuple[float, ...] | list[float]) -> None:
    """Make ``levels`` (2 to 256 strictly increasing numbers in [-1, 1]) the codebook ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"codebook name={name!r}: expected a non-empty string")
    levels = tuple(float(level) for level in levels)
    if not 2 <= len(levels) <= 256:
        raise ValueError(f"codebook {name!r}: {len(levels)} levels; allowed are 2 to 256")
    if any(b <= a for a, b in zip(levels, levels[1:], strict=False)) or not -1 <= levels[0] <= levels[-1] <= 1:
        raise ValueError(f"codebook {name!r}: levels={levels} must increase strictly within [-1, 1]")
    if name in CODEBOOKS and CODEBOOKS[name] != levels:
        raise ValueError(f"codebook {name!r} is already registered with other levels")
    CODEBOOKS[name] = levels


def codebook_levels(name: str) -> tuple[float, ...]:
    if name not in CODEBOOKS:
        raise ValueError(f"codebook={name!r} is not registered; registered are {sorted(CODEBOOKS)}")
    return CODEBOOKS[name]


def quantize_codebook(x: torch.Tensor, amax: torch.Tensor | float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, ``x``'s shape) and the float32 scale (``amax``, tiny -> 1); ``amax`` broadcasts against ``x``."""
    x32 = as_float32(x, "x")
    scale = as_float32_like(amax, x32, "amax")
    scale = torch.where(scale <= TINY_AMAX, 1.0, scale)
    levels = torch.tensor(codebook_levels(name), dtype=torch.float32, device=x32.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.searchsorted(midpoints, (x32 / scale).contiguous(), side="left")
    return codes.to(torch.uint8), scale


def dequantize_codebook(codes: torch.Tensor, scale: torch.Tensor | float, name: str,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``levels[codes] * scale`` in float32, returned as ``dtype``."""
    check_integer(codes, "codes")
    levels = torch.tensor(codebook_levels(name), dtype=torch.float32, device=codes.device)[codes.long()]
    return (levels * as_float32_like(scale, levels, "scale")).to(dtype)


def fake_quant_codebook(x: torch.Tensor, amax: torch.Tensor | float, name: str) -> torch.Tensor:
    """``dequantize_codebook(*quantize_codebook(x, amax, name), name)`` in ``x``'s dtype."""
    codes, scale = quantize_codebook(x, amax, name)
    return dequantize_codebook(codes, scale, name, x.dtype)
