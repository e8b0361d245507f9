"""A linear's output change under a format, computed from its weight and input changes in a lower precision.

The gradient score needs ``dy_f = y_f - y``, the change of a module's output when it alone is in format f.
Subtracting two outputs computed in bfloat16 loses ``dy`` in their rounding (8 significant bits of ``y``,
while an FP8 weight moves ``y`` by ~2 %). For a linear ``y = x W^T + b`` the change is written instead from
the changes themselves, each rounded relative to its own size:

    x_s = x * p,   W_s = W / p      (p: the format's pre_quant_scale, 1 without one; x_s W_s^T = x W^T)
    x_q = Q_in(x_s),   W_q = Q_w(W_s)
    dy  = x_q W_q^T - x_s W_s^T = x_q (W_q - W_s)^T + (x_q - x_s) W_s^T

(the bias cancels; the second term only when the format quantizes the input). ``W_q - W_s`` is computed once
in float32 and kept in the score dtype (one ``(out, in)`` copy per module and format, plus ``W_s`` when the
input is quantized); per call, ``x_q - x_s`` in float32, then the one or two matmuls in the score dtype with
float32 accumulation. A module for which this does not hold (not a plain quantized linear, an output quantizer,
a kept weight that is not ``W / p``) gets None: it is scored by calling it (``lowbit.search.scores``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.modules.linear import QuantLinear
from lowbit.quantizer import TensorQuantizer

SCALED_WEIGHT_RTOL = 1e-5  # |W_s * p - W| / |W|: the kept weight is the float one divided by the input scale


@dataclass(frozen=True)
class LinearChange:
    """``dy`` of one linear in one format (module docstring): ``weight_change`` ``W_q - W_s`` and, when the
    format quantizes the input, ``stored_weight`` ``W_s``, both ``(out, in)`` in the score dtype; the format's
    ``input_quantizer`` (None: input not quantized) and ``pre_quant_scale`` ``p`` (``(in,)`` or None)."""

    weight_change: Tensor
    stored_weight: Tensor | None
    input_quantizer: TensorQuantizer | None
    pre_quant_scale: Tensor | None

    def __call__(self, x: Tensor) -> Tensor:
        """``dy`` for the input ``x`` (``(..., in)``, any float dtype), in the score dtype."""
        dtype = self.weight_change.dtype
        x = x.detach().float()
        scaled = x if self.pre_quant_scale is None else x * self.pre_quant_scale
        if self.input_quantizer is None:
            return F.linear(scaled.to(dtype), self.weight_change)
        quantized = self.input_quantizer(x).float()
        change = F.linear(quantized.to(dtype), self.weight_change)
        return change + F.linear((quantized - scaled).to(dtype), self.stored_weight)


def linear_change(module: nn.Module, slots: dict[str, nn.Module], stored_weight: Tensor, float_weight: Tensor,
                  dtype: torch.dtype) -> LinearChange | None:
    """The :class:`LinearChange` of ``module`` when its quantizer slots hold ``slots`` and its weight is
    ``stored_weight`` (``float_weight`` in the unquantized model); None when the module docstring's formula
    does not describe it."""
    if type(module).forward is not QuantLinear.forward:
        return None
    output_quantizer = slots.get("output_quantizer")
    input_quantizer = slots.get("input_quantizer")
    if output_quantizer is not None and output_quantizer.is_enabled:
        return None
    if not isinstance(input_quantizer, TensorQuantizer):
        return None
    with torch.no_grad():
        scale = input_quantizer.pre_quant_scale
        stored = stored_weight.detach().float()
        unscaled = stored if scale is None else stored * scale.float()
        if (unscaled - float_weight.float()).norm() > SCALED_WEIGHT_RTOL * float_weight.float().norm():
            return None
        quantized = slots["weight_quantizer"](stored).float()
        quantizes_input = input_quantizer.is_enabled
        return LinearChange((quantized - stored).to(dtype), stored.to(dtype) if quantizes_input else None,
                            input_quantizer if quantizes_input else None,
                            None if scale is None else scale.detach().float())
