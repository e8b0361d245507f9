"""Per-block scale selection for NVFP4 and MXFP4: each block's scale chosen among candidates by the block's
squared error, in place of the scale the block's own max |x| gives.

A choice is returned as ``block_amax`` (shape (..., K // block)), the value the format's scale formula takes
in place of the block's max (``fake_quant_nvfp4(..., block_amax=)``, ``fake_quant_mx(..., block_amax=)``), so
codes and scales always come from the format's own functions.

NVFP4 (``g`` the global scale, ``s6 = e4m3(amax / (6 g))`` the default block scale):

- ``"4over6"`` (Four Over Six): two candidates per block, its max mapped to 6 (``s6``, the default) or to
  4 (``e4m3(amax / (4 g))``, ``block_amax = 1.5 amax``): the E2M1 grid near the max is {4, 6}, so a block whose
  large values sit near 5 loses less on the finer grid 0..4;
- ``"mse"``: the E4M3 code points from 3 below to 4 above ``s6`` (about 0.7x to 1.5x; 4 above is the 4/6
  choice when ``s6``'s mantissa is 1), ``block_amax = s 6 g`` for each candidate scale ``s``.

MXFP4 (``e0 = floor(log2 amax) - 2``, the OCP exponent): ``"mse"`` tries ``e0 - 1``, ``e0``, ``e0 + 1``
(``block_amax = 2**(e + 2)``: the formula gives back ``e``).

The error of a candidate is ``sum (x - x_hat)^2`` over its block (float32); ties keep the default scale
(candidates are ordered with the default first).
"""

from __future__ import annotations

import torch

from ._common import as_float32, pow2
from .blocks import to_blocks
from .minifloat import E2M1, E4M3, FloatFormat
from .mx import MX_BLOCK_SIZE, _shared_exponent, fake_quant_mx
from .nvfp4 import NVFP4_BLOCK_SIZE, _global_scale, fake_quant_nvfp4

NVFP4_METHODS = ("4over6", "mse")
MX_METHODS = ("mse",)
E4M3_STEPS = (0, -3, -2, -1, 1, 2, 3, 4)  # code-point offsets from the default scale, default first
MX_EXPONENT_STEPS = (0, -1, 1)


def _best(x: torch.Tensor, block_size: int, candidates: list[torch.Tensor], fake_quant) -> torch.Tensor:
    """The candidate ``block_amax`` with the smallest block squared error, per block (first wins ties)."""
    blocks = to_blocks(x, block_size)
    errors = torch.stack([(to_blocks(fake_quant(c), block_size) - blocks).square().sum(-1) for c in candidates])
    errors = errors.nan_to_num(nan=float("inf"))
    choice = errors.argmin(dim=0, keepdim=True)  # argmin returns the first minimum
    return torch.stack(candidates).gather(0, choice)[0]


def _e4m3_neighbours(scale: torch.Tensor, steps: tuple[int, ...]) -> list[torch.Tensor]:
    """E4M3 values ``steps`` code points from ``scale`` (positive, E4M3-representable), clamped to 1..126
    (the smallest subnormal to 448; 127 is NaN)."""
    codes = scale.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
    return [torch.clamp(codes + step, 1, 126).to(torch.uint8).view(torch.float8_e4m3fn).float() for step in steps]


def nvfp4_candidates(x: torch.Tensor, global_amax: torch.Tensor | float | None = None, method: str = "mse",
                     block_size: int = NVFP4_BLOCK_SIZE) -> list[torch.Tensor]:
    """The ``block_amax`` candidates (each (..., K // block_size), the default first) of ``method`` for NVFP4."""
    if method not in NVFP4_METHODS:
        raise ValueError(f"NVFP4 scale search: method={method!r}; allowed are {list(NVFP4_METHODS)}")
    x32 = as_float32(x, "x")
    amax = to_blocks(x32, block_size).abs().amax(-1)
    if method == "4over6":
        return [amax, amax * (E2M1.max_value / 4)]
    unit = E2M1.max_value * _global_scale(x32, global_amax)
    default = (amax / unit).clamp(max=E4M3.max_value).to(torch.float8_e4m3fn).float()
    neighbours = _e4m3_neighbours(default.clamp_min(2.0**-9), E4M3_STEPS[1:])
    return [amax, *(torch.where(amax > 0, s * unit, amax) for s in neighbours)]


def nvfp4_block_amax(x: torch.Tensor, global_amax: torch.Tensor | float | None = None, method: str = "mse",
                     block_size: int = NVFP4_BLOCK_SIZE) -> torch.Tensor:
    """The ``block_amax`` (..., K // block_size) of the NVFP4 scale each block's search picks (see the module
    docstring); ``global_amax`` as in ``quantize_nvfp4``."""
    x32 = as_float32(x, "x")
    candidates = nvfp4_candidates(x32, global_amax, method, block_size)

    def fake_quant(block_amax):
        return fake_quant_nvfp4(x32, global_amax, block_size, block_amax=block_amax)

    return _best(x32, block_size, candidates, fake_quant)


def mx_candidates(x: torch.Tensor, element_format: FloatFormat, method: str = "mse",
                  block_size: int = MX_BLOCK_SIZE) -> list[torch.Tensor]:
    """The ``block_amax`` candidates (each (..., K // block_size), the default first) of ``method`` for MX."""
    if method not in MX_METHODS:
        raise ValueError(f"MX scale search: method={method!r}; allowed are {list(MX_METHODS)}")
    amax = to_blocks(as_float32(x, "x"), block_size).abs().amax(-1)
    usable = torch.isfinite(amax) & (amax > 0)
    exponent = torch.where(usable, _shared_exponent(amax, element_format), 0.0)
    top = 127 - element_format.max_exponent  # 2**(e + emax) stays a float32 normal

    def block_amax_of(step: int) -> torch.Tensor:
        return torch.where(usable, pow2(torch.clamp(exponent + step, -127, top) + element_format.max_exponent), amax)

    return [amax] + [block_amax_of(step) for step in MX_EXPONENT_STEPS[1:]]


def mx_block_amax(x: torch.Tensor, element_format: FloatFormat, method: str = "mse",
                  block_size: int = MX_BLOCK_SIZE) -> torch.Tensor:
    """The ``block_amax`` (..., K // block_size) of the shared exponent each MX block's search picks."""
    x32 = as_float32(x, "x")
    candidates = mx_candidates(x32, element_format, method, block_size)

    def fake_quant(block_amax):
        return fake_quant_mx(x32, element_format, block_size, block_amax=block_amax)

    return _best(x32, block_size, candidates, fake_quant)
