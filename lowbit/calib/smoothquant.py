"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, per input channel.

``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` with ``max|W_j|`` over every output row of every linear
reading the input (q, k and v together). Then ``x / s`` feeds the linears and their weight columns are
multiplied by ``s``: folded into the preceding norm where possible, else as the input quantizer's
``pre_quant_scale`` (``lowbit.calib.scaling``). The float output is unchanged; the activation range
shrinks where it had outliers, the weight range grows a little.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from lowbit.calib.layerwise import LayerInputs, LayerReport, quantizers_disabled, recalibrate_weights, run_layerwise
from lowbit.calib.scaling import apply_input_scale, find_input_groups


def smoothquant_scale(activation_amax: Tensor, weight_amax: Tensor, alpha: float) -> Tensor:
    """``s = activation_amax**alpha / weight_amax**(1 - alpha)`` per input channel, float32, shape ``(in,)``.

    A channel with a zero on either side carries no information and gets ``s = 1``.
    """
    if activation_amax.shape != weight_amax.shape or activation_amax.dim() != 1:
        raise ValueError(
            f"activation_amax {tuple(activation_amax.shape)} and weight_amax {tuple(weight_amax.shape)} "
            "must both have shape (in_features,)"
        )
    activation_amax, weight_amax = activation_amax.float(), weight_amax.float()
    valid = (activation_amax > 0) & (weight_amax > 0)
    scale = activation_amax.clamp_min(1e-30).pow(alpha) / weight_amax.clamp_min(1e-30).pow(1 - alpha)
    return torch.where(valid, scale, torch.ones_like(scale))


def smoothquant_layer(layer: nn.Module, inputs: LayerInputs, alpha: float = 0.5) -> None:
    """Smooth every group of linears in ``layer`` whose input quantizers are all enabled."""
    groups = [
        group
        for group in find_input_groups(layer, inputs)
        if all(linear.input_quantizer.is_enabled for linear in group.linears.values())
    ]
    activation_amax: dict[str, Tensor] = {}

    def record(name: str, x: Tensor) -> None:
        amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        activation_amax[name] = torch.maximum(activation_amax[name], amax) if name in activation_amax else amax

    firsts = {next(iter(group.linears)): group.first for group in groups}
    with quantizers_disabled(layer):
        inputs.feed(layer, firsts, record)
    for group in groups:
        weight_amax = torch.stack([w.weight.detach().abs().amax(dim=0).float() for w in group.linears.values()])
        scale = smoothquant_scale(activation_amax[next(iter(group.linears))], weight_amax.amax(dim=0), alpha)
        apply_input_scale(layer, inputs, group, scale)
        for linear in group.linears.values():
            recalibrate_weights(linear)


def smoothquant(model: nn.Module, forward_loop, alpha: float = 0.5) -> list[LayerReport]:
    """Smooth every decoder layer of ``model`` (see :func:`smoothquant_layer`), one layer at a time."""
    return run_layerwise(model, forward_loop, partial(smoothquant_layer, alpha=alpha), "smoothquant")


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must be a number in [0, 1]")
    return float(alpha)
