"""A chain of weight quantizers in a checkpoint's divisor form (ModelOpt's W4A8: INT4 blocks, then FP8 per tensor).

A checkpoint stores codes and divisor steps, ``x_hat = code * step`` with ``step = amax / maxbound`` in float32
(ModelOpt's ``weight_scale`` / ``weight_scale_2``); lowbit's fake quantization divides by its multiplicative
``scale = maxbound / amax``. The two differ by one float32 rounding in about half the elements, which is harmless
for one stage but decides a second stage's rounding wherever its input sits exactly on a midpoint: in a bf16
model both amaxes are bf16 numbers (8-bit significands), so an INT4 value over the FP8 step,
``code * 64 * amax_block / amax_tensor``, is an exact E4M3 midpoint for ~0.1 % of the weight (measured on the
bundled model's q_proj: 209 of 65,536), and the two float32 routes put it on either side.

So a chain computes, from the stored numbers only (what a loader of the checkpoint can compute too):

- first stage: ``codes`` as the stage's own quantization gives them (``x / step``, the codes its export packs),
  ``y = codes * step_1`` (float32, one rounding);
- each later stage: ``y' = round(y / step_k) * step_k`` (float32 division, the stage's rounding: INT
  ``clamp(round_half_even)``, FP nearest-even saturating).

A step ``<= 2**-24 / maxbound`` (an amax ``<= 2**-24``) counts as 1, as the multiplicative scale does.
"""

from __future__ import annotations

import torch

from ._common import TINY_AMAX, as_float32, as_float32_like, divide
from .integer import int_range
from .minifloat import FloatFormat, round_to_format


def grid_maxbound(fmt: FloatFormat | int) -> float:
    """The largest code magnitude: a FloatFormat's max value, or ``2**(bits - 1) - 1`` for a signed integer width."""
    return fmt.max_value if isinstance(fmt, FloatFormat) else float(int_range(fmt)[1])


def divisor_step(amax: torch.Tensor, maxbound: float) -> torch.Tensor:
    """``amax / maxbound`` in float32 (IEEE division on every device): the step a checkpoint stores."""
    return divide(as_float32(amax, "amax"), maxbound)


def dequantize_by_step(codes: torch.Tensor, step: torch.Tensor, maxbound: float) -> torch.Tensor:
    """``codes * step`` in float32 (``step`` broadcast against ``codes``; a tiny step counts as 1)."""
    codes32 = as_float32(codes, "codes")
    return codes32 * _usable(as_float32_like(step, codes32, "step"), maxbound)


def fake_quant_by_step(x: torch.Tensor, step: torch.Tensor, fmt: FloatFormat | int) -> torch.Tensor:
    """``round(x / step) * step`` in float32: a later stage of a chain. ``fmt`` a FloatFormat (nearest, ties to even,
    saturating at its max) or a signed integer width (``clamp(round_half_even(.), qmin, qmax)``)."""
    x32 = as_float32(x, "x")
    step32 = _usable(as_float32_like(step, x32, "step"), grid_maxbound(fmt))
    ratio = divide(x32, step32)
    if isinstance(fmt, FloatFormat):
        return round_to_format(ratio, fmt) * step32
    qmin, qmax = int_range(fmt)
    return torch.clamp(torch.round(ratio), qmin, qmax) * step32


def _usable(step: torch.Tensor, maxbound: float) -> torch.Tensor:
    return torch.where(step <= TINY_AMAX / maxbound, 1.0, step)
