"""Which layers get the primary (4-bit) mode: NNCF's sensitivity metrics and its ratio rule.

Every metric scores a ratio-defining layer from the error of its weight in INT8_ASYM per output channel,
``E = int8_asym(W) - W`` (``W`` as ``(out, in)``, float32), and for the data-aware metrics from a
statistic of the layer's input ``x`` (shape ``(..., tokens, in)``), computed for each call of the layer
(one per dataset item) and averaged over the calls:

==========================  =======================================  ===================================
metric                      weight term                              input statistic of one call
==========================  =======================================  ===================================
WEIGHT_QUANTIZATION_ERROR   ``1 / (max_o mean_i E[o, i]**2 + eps)``  (none: the score is the weight term)
HESSIAN_INPUT_ACTIVATION    ``||E||_F``                              ``2 * mean(x**2)`` (the Hessian
                                                                     trace of ``||x W^T||^2`` per entry)
MEAN_ACTIVATION_VARIANCE    ``1 / (max_o mean_i E**2 + eps)``        ``mean(var(x, dim=-2))``
MAX_ACTIVATION_VARIANCE     ``1 / (max_o mean_i E**2 + eps)``        ``max(var(x, dim=-2))``
MEAN_ACTIVATION_MAGNITUDE   ``1 / (max_o mean_i E**2 + eps)``        ``mean(max(|x|, dim=-2))``
==========================  =======================================  ===================================

Data-aware score = weight term * mean input statistic; ``var`` is the population variance over the
token axis; ``eps`` is float32's machine epsilon. Embeddings (ratio-defining only with ``all_layers``)
score 0 under the data-aware metrics, as in NNCF. A low score means a layer that can take fewer bits.

Ratio rule (:func:`select_primary`): walk the layers by ascending score (ties in layer order) and give
each the primary mode while the primary share of the ratio-defining weights, counting that layer,
stays below ``ratio``; stop at the first layer that would reach it. ``ratio=1`` gives every layer the
primary mode.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from functools import partial

import torch
from torch import nn

from lowbit import formats
from lowbit.weight_compression.layers import EMBEDDING, WeightLayer

EPS = torch.finfo(torch.float32).eps


class SensitivityMetric(str, Enum):
    """How layers are ranked for the primary mode (values as NNCF's ``SensitivityMetric``)."""

    WEIGHT_QUANTIZATION_ERROR = "weight_quantization_error"
    HESSIAN_INPUT_ACTIVATION = "hessian_input_activation"
    MEAN_ACTIVATION_VARIANCE = "mean_activation_variance"
    MAX_ACTIVATION_VARIANCE = "max_activation_variance"
    MEAN_ACTIVATION_MAGNITUDE = "mean_activation_magnitude"

    @property
    def is_data_aware(self) -> bool:
        return self != SensitivityMetric.WEIGHT_QUANTIZATION_ERROR


def int8_asym_error(matrix: torch.Tensor) -> torch.Tensor:
    """``int8_asym(W) - W`` for ``W`` of shape ``(out, in)``: min/max per output channel, float32."""
    low = matrix.amin(dim=1, keepdim=True)
    high = matrix.amax(dim=1, keepdim=True)
    return formats.fake_quant_int_asym(matrix, low, high, 8) - matrix


def weight_term(matrix: torch.Tensor, metric: SensitivityMetric) -> float:
    """The weight factor of ``metric``'s score (see the module docstring), from the ``(out, in)`` weight."""
    error = int8_asym_error(matrix).double()
    if metric == SensitivityMetric.HESSIAN_INPUT_ACTIVATION:
        return torch.linalg.norm(error).item()
    return 1.0 / (error.square().mean(dim=1).max().item() + EPS)


def input_statistic(x: torch.Tensor, metric: SensitivityMetric) -> float:
    """``metric``'s statistic of one input ``x`` of shape ``(..., tokens, in)``, computed in float32."""
    if x.dim() < 2:
        raise ValueError(
            f"sensitivity_metric={metric.value} needs layer inputs with a token axis (>= 2 dims), got shape "
            f"{tuple(x.shape)}"
        )
    x = x.detach().float()
    if metric == SensitivityMetric.HESSIAN_INPUT_ACTIVATION:
        return 2.0 * x.square().mean().item()
    if metric == SensitivityMetric.MEAN_ACTIVATION_MAGNITUDE:
        return x.abs().amax(dim=-2).mean().item()
    variance = x.var(dim=-2, correction=0)
    if metric == SensitivityMetric.MEAN_ACTIVATION_VARIANCE:
        return variance.mean().item()
    if metric == SensitivityMetric.MAX_ACTIVATION_VARIANCE:
        return variance.max().item()
    raise ValueError(f"sensitivity_metric={metric.value} has no input statistic")


def collect_input_statistics(
    model: nn.Module,
    layers: list[WeightLayer],
    metric: SensitivityMetric,
    forward_loop: Callable[[nn.Module], None],
) -> dict[str, float]:
    """Mean of ``input_statistic`` over every call of each layer during one run of ``forward_loop``.

    Forward pre-hooks read each layer's first input; they are removed afterwards. Raises ValueError
    naming the layers that were never called.
    """
    totals = {layer.name: [0.0, 0] for layer in layers}

    def record(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        totals[name][0] += input_statistic(x, metric)
        totals[name][1] += 1

    handles = [layer.module.register_forward_pre_hook(partial(record, layer.name), with_kwargs=True)
               for layer in layers]
    try:
        forward_loop(model)
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name, (_, calls) in totals.items() if calls == 0]
    if unused:
        raise ValueError(f"the dataset never reached layers {unused}; their input statistics are undefined")
    return {name: total / calls for name, (total, calls) in totals.items()}


def sensitivity_scores(
    layers: list[WeightLayer],
    metric: SensitivityMetric,
    input_statistics: dict[str, float] | None = None,
) -> list[float]:
    """One score per layer (see the module docstring); data-aware metrics need ``input_statistics``."""
    scores = []
    for layer in layers:
        if metric.is_data_aware and layer.kind == EMBEDDING:
            scores.append(0.0)
            continue
        score = weight_term(layer.matrix(), metric)
        if metric.is_data_aware:
            score *= input_statistics[layer.name]
        scores.append(score)
    return scores


def select_primary(num_weights: list[int], scores: list[float], ratio: float) -> list[int]:
    """Indices of the layers that get the primary mode under the ratio rule (module docstring)."""
    if len(num_weights) != len(scores):
        raise ValueError(f"num_weights has {len(num_weights)} entries but scores has {len(scores)}")
    if ratio >= 1:
        return list(range(len(scores)))
    total = sum(num_weights)
    chosen, primary_weights = [], 0
    for index in sorted(range(len(scores)), key=lambda i: scores[i]):
        if (primary_weights + num_weights[index]) / total >= ratio:
            break
        chosen.append(index)
        primary_weights += num_weights[index]
    return sorted(chosen)
