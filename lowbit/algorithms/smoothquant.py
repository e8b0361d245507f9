"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, per input channel.

``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` with ``max|W_j|`` over every output row of every linear
reading the input (q, k and v together), clamped to ``[1e-4, 1e4]``. Then ``x / s`` feeds the linears
and their weight columns are multiplied by ``s``: folded into the preceding norm where possible, else as
the input quantizer's ``pre_quant_scale`` (``lowbit.algorithms.scaling``). The float output is unchanged; the
activation range shrinks where it had outliers, the weight range grows.

One pass of the calibration data, as ModelOpt's ``smoothquant``:

1. ``forward_loop`` runs once on the float model (``lowbit.calibration.calibration_pass``; the weights are
   rescaled after it, so quantized weights would show activations no inference sees): the activation
   quantizers that are not smoothed get their calibration; each smoothed linear records ``max|X_j|`` of
   its input; each decoder layer's first call is traced (which linears share an input, which norm made
   it, rows of that norm's input and output).
2. Per group: the scale, the weights (and their static amax), the fold or pre_quant_scale
   (``lowbit.algorithms.scaling.apply_input_scale``: a fold is kept only if the folded norm reproduces the
   traced rows, so a norm computing ``x * (1 + weight)`` gets a pre_quant_scale instead).
3. A static per-tensor input quantizer with the max calibrator gets ``amax = max_j max|X_j| / s_j``,
   exactly what max calibration of the smoothed inputs gives, with no second pass. Other static
   calibrators (percentile, mse, entropy, asymmetric, per-channel) are run in one more pass.

Repeated blocks only (``lowbit.structure.blocks``); weights outside them keep max calibration. With
``alpha=1`` (ModelOpt's default) ``s_j = max|X_j|``: every smoothed channel has range 1 and the weight
scales take the whole activation range.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.algorithms.activation_ranges import ChannelMaxima, is_analytic, smoothed_amax
from lowbit.algorithms.layerwise import LayerReport, layer_errors, recalibrate_weights, tensor_quantizers
from lowbit.algorithms.scaling import apply_input_scale
from lowbit.calibration import calibrate_weights, calibration_pass, iter_quantizers
from lowbit.quantizer import TensorQuantizer
from lowbit.structure.blocks import require_block_stacks
from lowbit.structure.groups import GroupTrace, InputGroup, row_weights
from lowbit.structure.weights import QuantizableWeight

logger = logging.getLogger(__name__)
SCALE_RANGE = (1e-4, 1e4)  # ModelOpt's clamp of the smoothing factor
DEFAULT_ALPHA = 1.0  # ModelOpt's SmoothQuantCalibConfig default


def smoothquant_scale(activation_amax: Tensor, weight_amax: Tensor, alpha: float) -> Tensor:
    """``s = clamp(activation_amax**alpha / weight_amax**(1 - alpha), 1e-4, 1e4)`` per input channel,
    float32, shape ``(in,)``. A channel with a zero on either side carries no information and gets ``s = 1``.
    """
    if activation_amax.shape != weight_amax.shape or activation_amax.dim() != 1:
        raise ValueError(
            f"activation_amax {tuple(activation_amax.shape)} and weight_amax {tuple(weight_amax.shape)} "
            "must both have shape (in_features,)"
        )
    activation_amax, weight_amax = activation_amax.float(), weight_amax.float()
    valid = (activation_amax > 0) & (weight_amax > 0)
    scale = activation_amax.clamp_min(1e-30).pow(alpha) / weight_amax.clamp_min(1e-30).pow(1 - alpha)
    return torch.where(valid, scale.clamp(*SCALE_RANGE), torch.ones_like(scale))


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must be a number in [0, 1]")
    return float(alpha)


def _input_quantizer(linear: QuantizableWeight) -> TensorQuantizer:
    return tensor_quantizers(linear.input_quantizer)[0]


class _FirstCallTraces:
    """Per decoder layer, the input groups traced in its first call (which linears share an input, which
    norm made it, rows of that norm's input and output)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.groups: dict[int, list[InputGroup]] = {}
        self._traces: dict[int, GroupTrace] = {}
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(
                lambda module, _args, index=index: self._start(index, module)))
            self.handles.append(layer.register_forward_hook(
                lambda _module, _args, _output, index=index: self._finish(index)))

    def _start(self, index: int, layer: nn.Module) -> None:
        if index not in self.groups and index not in self._traces:
            self._traces[index] = GroupTrace(layer, row_weights(layer))

    def _finish(self, index: int) -> None:
        trace = self._traces.pop(index, None)
        if trace is not None:
            self.groups[index] = trace.close()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for trace in self._traces.values():
            trace.close()


def smoothquant(model: nn.Module, forward_loop: Callable[[nn.Module], None], alpha: float = DEFAULT_ALPHA,
                report: bool = False) -> list[LayerReport]:
    """Smooth every linear of ``model``'s decoder layers whose input quantizer is enabled (see the module
    docstring). With ``report=True``, one more pass measures each decoder layer's output MSE against its
    float output (``lowbit.algorithms.layerwise.layer_errors``); otherwise the report is empty."""
    check_alpha(alpha)
    named_layers = [(f"{stack}.{index}", layer) for stack, layers in require_block_stacks(model, "smoothquant")
                    for index, layer in enumerate(layers)]
    layers = [layer for _, layer in named_layers]
    targets = [linear for layer in layers for linear in row_weights(layer).values()
               if linear.input_quantizer.is_enabled]
    for name, linear in row_weights(model).items():
        if linear in targets and _input_quantizer(linear).pre_quant_scale is not None:
            raise ValueError(f"{name}: input_quantizer already has a pre_quant_scale; smooth a model once")
    smoothed_inputs = {_input_quantizer(linear) for linear in targets}
    others = [q for name, quantizer in iter_quantizers(model) if not name.endswith("weight_quantizer")
              for q in tensor_quantizers(quantizer)
              if q.is_enabled and not q.config.is_dynamic and q not in smoothed_inputs]

    calibrate_weights(model)
    maxima, first_calls = ChannelMaxima(targets), _FirstCallTraces(layers)
    try:
        for quantizer in smoothed_inputs:  # pass-through during the pass: no statistics, no dynamic quantization
            quantizer.disable()
        calibration_pass(model, forward_loop, others, float_model=True)
    finally:
        for quantizer in smoothed_inputs:
            quantizer.enable()
        maxima.close()
        first_calls.close()

    target_set = set(targets)
    to_recalibrate = []
    for index, (layer_name, layer) in enumerate(named_layers):
        groups = [g for g in first_calls.groups.get(index, []) if set(g.linears.values()) <= target_set]
        grouped = {linear for group in groups for linear in group.linears.values()}
        groups += [InputGroup({name: linear}, None) for name, linear in row_weights(layer).items()
                   if linear in target_set and linear not in grouped]  # not reached by the first call
        for group in groups:
            if group.first not in maxima.amax:
                logger.warning("smoothquant: %s.%s saw no calibration data; left unsmoothed", layer_name,
                               next(iter(group.linears)))
                continue
            activation_amax = maxima.amax[group.first]
            weight_amax = torch.stack([w.weight.detach().abs().amax(dim=0).float() for w in group.linears.values()])
            scale = smoothquant_scale(activation_amax, weight_amax.amax(dim=0), alpha)
            apply_input_scale(group, scale)
            for linear in group.linears.values():
                quantizer = _input_quantizer(linear)
                if is_analytic(quantizer):
                    quantizer.set_amax(smoothed_amax(activation_amax, scale))
                elif not quantizer.config.is_dynamic:
                    to_recalibrate.append(quantizer)
                recalibrate_weights(linear)
    if to_recalibrate:
        calibration_pass(model, forward_loop, to_recalibrate, float_model=True)
    return layer_errors(model, forward_loop) if report else []
