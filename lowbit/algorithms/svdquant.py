"""SVDQuant (Li et al. 2024, "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models";
MIT Han lab's deepcompressor / nunchaku): for W4A4, smooth the activation outliers into the weights, then take
the weights' largest singular directions out into a 16-bit low-rank branch and quantize only the residual.

Per decoder block (the layer-wise runner, ``lowbit.algorithms.layerwise``), for each group of linears reading one
input (``lowbit.structure.groups``), with ``X`` the block's calibration inputs as they reach the group:

1. smoothing, only when the group's input quantizers are enabled (weight-only formats have no activation
   outliers to move): ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (SmoothQuant's formula,
   ``smoothquant.smoothquant_scale``; ``W_j`` column ``j`` over every linear of the group), ``x -> x / s`` folded
   into the norm or set as the input quantizer's ``pre_quant_scale``, ``W -> W diag(s)``
   (``scaling.apply_input_scale``);
2. per linear with an enabled weight quantizer, the SVD of the smoothed weight ``W' = U S V^T`` (float64) and its
   best rank-``r`` approximation ``L1 L2`` (Eckart-Young), ``L1 = U_r S_r`` ``(out, r)``, ``L2 = V_r^T`` ``(r, in)``;
3. the weight becomes the residual ``R = W' - L1 L2`` (its weight quantizer recalibrated on it) and ``L1 L2`` a
   float branch on the unquantized smoothed input (``lowbit.modules.low_rank``):
   ``y = Q(x / s) Q(R)^T + (x / s) L2^T L1^T + b``. The branch reads the layer's raw input, so with a
   ``pre_quant_scale`` ``p = 1 / s`` it stores ``A = L2 diag(p)``, ``B = L1``; folded into the norm, ``A = L2``.

The float function is unchanged (``R + L1 L2 = W'``). The residual has a smaller range than ``W'`` (the
directions carrying the migrated outliers are gone), so the 4-bit weight grid fits it better; the branch costs
``r (in + out)`` 16-bit weights and two thin matmuls per linear.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from lowbit.algorithms.activation_ranges import ChannelMaxima
from lowbit.algorithms.layerwise import LayerInputs, recalibrate_weights, tensor_quantizers, weights_reused
from lowbit.algorithms.scaling import apply_input_scale
from lowbit.algorithms.smoothquant import check_alpha, smoothquant_scale
from lowbit.modules.linear import QuantLinear
from lowbit.modules.low_rank import LowRankQuantLinear, add_low_rank
from lowbit.structure.groups import InputGroup, find_input_groups, row_weights
from lowbit.structure.weights import QuantizableWeight

logger = logging.getLogger(__name__)
SVDQUANT_OPTIONS = {"rank": 32, "alpha": 0.5}


def low_rank_split(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(L1 (out, r), L2 (r, in), W - L1 L2)`` for ``weight`` W ``(out, in)`` (step 2 of the module docstring),
    ``r = min(rank, out, in)``; computed in float64, returned in ``weight``'s dtype."""
    w = weight.detach().double()
    u, singular, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, singular.numel())
    up, down = u[:, :r] * singular[:r], vh[:r]
    return up.to(weight.dtype), down.to(weight.dtype), (w - up @ down).to(weight.dtype)


def group_input_maxima(layer: nn.Module, inputs: LayerInputs, group: InputGroup) -> Tensor | None:
    """``max|X_j|`` ``(in,)`` of the group's input over every batch (the block run up to it); None if unseen."""
    maxima = ChannelMaxima([group.first])
    try:
        with weights_reused(layer):
            inputs.feed(layer, {"input": group.first}, lambda _name, _x: None, stop_after=group.first)
    finally:
        maxima.close()
    return maxima.amax.get(group.first)


def smooth_group(layer: nn.Module, inputs: LayerInputs, group: InputGroup, alpha: float) -> None:
    """Step 1 of the module docstring for one group (the measured input ranges follow the scaling)."""
    activation_amax = group_input_maxima(layer, inputs, group)
    if activation_amax is None:
        logger.warning("svdquant: %s saw no calibration data; left unsmoothed", next(iter(group.linears)))
        return
    weight_amax = torch.stack([w.weight.detach().abs().amax(dim=0).float() for w in group.linears.values()])
    apply_input_scale(group, smoothquant_scale(activation_amax, weight_amax.amax(dim=0), alpha), inputs.ranges)


def split_linear(linear: QuantizableWeight, rank: int, name: str) -> None:
    """Steps 2-3 of the module docstring for one (smoothed) linear."""
    up, down, residual = low_rank_split(linear.weight, rank)
    pre_quant_scale = tensor_quantizers(linear.input_quantizer)[0].pre_quant_scale
    if pre_quant_scale is not None:
        down = down * pre_quant_scale.to(down)
    with torch.no_grad():
        linear.weight.copy_(residual)
    add_low_rank(linear.module, down, up, name=name)
    recalibrate_weights(linear)


def svdquant_layer(layer: nn.Module, inputs: LayerInputs, rank: int = 32, alpha: float = 0.5) -> None:
    """SVDQuant of every group of ``layer`` that has a linear with an enabled weight quantizer."""
    for group in find_input_groups(layer, inputs):
        quantized = {name: w for name, w in group.linears.items() if w.weight_quantizer.is_enabled}
        if not quantized:
            continue
        if any(w.input_quantizer.is_enabled for w in group.linears.values()):
            smooth_group(layer, inputs, group, alpha)
        for name, linear in quantized.items():
            split_linear(linear, rank, name)


def svdquant_weights(layer: nn.Module, prefix: str = "", check_scaled: bool = True) -> dict[str, QuantizableWeight]:
    """The weights of ``layer`` with an enabled weight quantizer; ValueError naming (after ``prefix``) the first
    that is not a quantized nn.Linear (the low-rank branch lives in ``LowRankQuantLinear``) or, with
    ``check_scaled``, a linear whose input is scaled already (a model is smoothed once). LoRA correction
    checks the first only."""
    weights = {name: w for name, w in row_weights(layer).items() if w.weight_quantizer.is_enabled}
    for name, weight in weights.items():
        if type(weight.module) not in (QuantLinear, LowRankQuantLinear):
            raise ValueError(f"{prefix}{name}: a low-rank float branch needs a quantized nn.Linear, got "
                             f"{type(weight.module).__name__}")
    scaled = [name for name, weight in row_weights(layer).items()
              if any(q.pre_quant_scale is not None for q in tensor_quantizers(weight.input_quantizer))]
    if check_scaled and scaled:
        raise ValueError(f"{prefix}{scaled[0]}: input_quantizer already has a pre_quant_scale; smooth a model once")
    return weights


def check_svdquant_options(options: dict) -> None:
    """ValueError naming the option unless rank >= 1 and 0 <= alpha <= 1."""
    if options["rank"] < 1:
        raise ValueError(f"svdquant: rank={options['rank']!r} must be an int >= 1")
    check_alpha(options["alpha"])
