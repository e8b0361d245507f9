"""Per-input-channel scaling shared by SmoothQuant and AWQ: ``y = (x / s) @ (W * s)^T = x @ W^T``.

A *group* is the quantized linears that read the same input tensor (Llama: q, k, v read
``input_layernorm``'s output; gate, up read ``post_attention_layernorm``'s). Groups are found by running
one batch with hooks and matching tensors by storage. For a group, ``s`` (per input channel) multiplies
every weight's columns, and ``1/s`` is applied to the input either

- folded into the producing norm (``norm.weight /= s``, ``norm.bias /= s``) when the norm's output goes
  to this group only; the layer's float output is checked unchanged (relative RMS change < 5%, well
  above bf16 rounding, far below a wrong fold) and the fold is undone otherwise, e.g. for norms that
  compute ``x * (1 + weight)``;
- or set as ``input_quantizer.pre_quant_scale = 1/s`` on each linear of the group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.calib.layerwise import LayerInputs, quantized_linears, quantizers_disabled, tensor_quantizers

FOLD_TOLERANCE = 0.05
logger = logging.getLogger(__name__)


@dataclass
class InputGroup:
    """Quantized linears sharing one input; ``norm`` is the module that produced it, if a norm did."""

    linears: dict[str, nn.Linear]
    norm: nn.Module | None

    @property
    def first(self) -> nn.Linear:
        return next(iter(self.linears.values()))


def is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, Tensor) and weight.dim() == 1


def find_input_groups(layer: nn.Module, inputs: LayerInputs) -> list[InputGroup]:
    """The layer's quantized linears grouped by shared input, in execution order.

    Batches are traced one at a time until every linear was called (MoE experts may skip a batch);
    a linear no batch reaches is in no group.
    """
    linears = quantized_linears(layer)
    groups: list[InputGroup] = []
    for call in inputs.calls:
        grouped = {name for group in groups for name in group.linears}
        if len(grouped) == len(linears):
            break
        groups += _groups_in_call(layer, call, {n: w for n, w in linears.items() if n not in grouped})
    unseen = set(linears) - {name for group in groups for name in group.linears}
    if unseen:
        logger.warning("no calibration batch reached %s; they are left as max calibration set them", sorted(unseen))
    return groups


def _groups_in_call(layer: nn.Module, call: tuple, linears: dict[str, nn.Linear]) -> list[InputGroup]:
    """Trace one call of ``layer``: group ``linears`` by input tensor, and find each group's norm."""
    inside_linear = {id(m) for linear in quantized_linears(layer).values() for m in linear.modules()}
    seen_inputs: list[tuple[str, Tensor]] = []  # (name, input) for every leaf module and linear call
    norm_outputs: list[tuple[nn.Module, Tensor]] = []  # kept alive so that storages are not reused
    handles = []
    for name, module in layer.named_modules():
        is_leaf = not any(True for _ in module.children())
        if name in linears or (is_leaf and id(module) not in inside_linear):
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: seen_inputs.append((name, args[0])) if args else None))
        if is_norm(module):
            handles.append(module.register_forward_hook(
                lambda m, _args, output: norm_outputs.append((m, output))))
    try:
        LayerInputs([call]).feed(layer, {}, lambda *_: None)
    finally:
        for handle in handles:
            handle.remove()

    groups: list[tuple[Tensor, InputGroup]] = []
    for name, x in seen_inputs:
        if name not in linears or any(name in group.linears for _, group in groups):
            continue
        shared = next((group for key, group in groups if _same_tensor(key, x)), None)
        if shared is None:
            groups.append((x, InputGroup({name: linears[name]}, None)))
        else:
            shared.linears[name] = linears[name]
    for key, group in groups:
        producers = [norm for norm, output in norm_outputs if _same_tensor(output, key)]
        other_readers = [n for n, x in seen_inputs if n not in group.linears and _same_tensor(x, key)]
        if len(producers) == 1 and not other_readers:
            group.norm = producers[0]
    return [group for _, group in groups]


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return isinstance(a, Tensor) and isinstance(b, Tensor) and a.data_ptr() == b.data_ptr() and a.shape == b.shape


def apply_input_scale(layer: nn.Module, inputs: LayerInputs, group: InputGroup, scale: Tensor) -> str:
    """Scale the group's weight columns by ``scale`` and its input by ``1/scale``; returns "folded" or
    "pre_quant_scale" (see the module docstring). The layer's float function is unchanged."""
    for name, linear in group.linears.items():
        if any(q.pre_quant_scale is not None for q in tensor_quantizers(linear.input_quantizer)):
            raise ValueError(f"{name}: input_quantizer already has a pre_quant_scale; smooth a model once")
    first_batch = LayerInputs(inputs.calls[:1])
    with torch.no_grad(), quantizers_disabled(layer):
        reference = next(first_batch.forward(layer)).float() if group.norm is not None else None
        for linear in group.linears.values():
            linear.weight.copy_(linear.weight.float() * scale.to(linear.weight.device))
        if group.norm is not None and _fold_into_norm(layer, first_batch, group.norm, scale, reference):
            return "folded"
        for linear in group.linears.values():
            quantizer = tensor_quantizers(linear.input_quantizer)[0]
            quantizer.pre_quant_scale = (1.0 / scale).float().to(linear.weight.device)
    return "pre_quant_scale"


def _fold_into_norm(layer: nn.Module, first_batch: LayerInputs, norm: nn.Module, scale: Tensor,
                    reference: Tensor) -> bool:
    """``norm.weight /= scale`` (and bias) if the layer's float output stays ``reference``, else undo.

    Called with the layer's quantizers disabled and the consumers' weights already scaled.
    """
    originals = {name: p.detach().clone() for name, p in norm.named_parameters(recurse=False)}
    for name in ("weight", "bias"):
        parameter = getattr(norm, name, None)
        if isinstance(parameter, Tensor):
            parameter.copy_(parameter.float() / scale.to(parameter.device))
    folded = next(first_batch.forward(layer)).float()
    change = (folded - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float32).tiny)
    if change <= FOLD_TOLERANCE:
        return True
    for name, value in originals.items():
        getattr(norm, name).copy_(value)
    return False
