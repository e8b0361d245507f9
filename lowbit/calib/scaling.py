"""Per-input-channel scaling shared by SmoothQuant and AWQ: ``y = (x / s) @ (W * s)^T = x @ W^T``.

A *group* is the quantized linears that read the same input tensor (Llama: q, k, v read
``input_layernorm``'s output; gate, up read ``post_attention_layernorm``'s). Groups are found by
running one call of the layer with hooks (:class:`GroupTrace`) and matching tensors by storage. For a
group, ``s`` (per input channel) multiplies every weight's columns, and ``1/s`` is applied to the input
either

- folded into the producing norm (``norm.weight /= s``, ``norm.bias /= s``) when the norm's output goes
  to this group only; the fold is checked on up to ``FOLD_CHECK_ROWS`` rows of the norm's traced input
  (the folded norm's output times ``s`` must match the traced output: relative RMS change < 5%, well
  above bf16 rounding, far below a wrong fold) and undone otherwise, e.g. for norms that compute
  ``x * (1 + weight)``;
- or set as ``input_quantizer.pre_quant_scale = 1/s`` on each linear of the group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.calib.activation_ranges import InputRanges
from lowbit.calib.layerwise import LayerInputs, quantized_linears, tensor_quantizers

FOLD_TOLERANCE = 0.05
FOLD_CHECK_ROWS = 64
logger = logging.getLogger(__name__)


@dataclass
class InputGroup:
    """Quantized linears sharing one input; ``norm`` is the module that produced it, if a norm did, and
    ``norm_rows`` up to ``FOLD_CHECK_ROWS`` rows of that norm's traced (input, output), ``(1, rows, dim)``."""

    linears: dict[str, nn.Linear]
    norm: nn.Module | None
    norm_rows: tuple[Tensor, Tensor] | None = None

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
    tracer = GroupTracer(layer)
    try:
        for call in inputs.calls:
            if tracer.complete:
                break
            LayerInputs([call]).feed(layer, {}, lambda *_: None)
    finally:
        tracer.close()
    tracer.warn_unseen()
    return tracer.groups


class GroupTracer:
    """Hooks on ``layer`` that trace each of its calls (a :class:`GroupTrace` of the quantized linears not
    grouped yet) until every one is in a group, or until :meth:`close`; ``groups`` in execution order."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.linears = quantized_linears(layer)
        self.groups: list[InputGroup] = []
        self._trace: GroupTrace | None = None
        self.handles = [layer.register_forward_pre_hook(self._start), layer.register_forward_hook(self._finish)]

    @property
    def grouped(self) -> set[str]:
        return {name for group in self.groups for name in group.linears}

    @property
    def complete(self) -> bool:
        return len(self.grouped) == len(self.linears)

    def _start(self, _layer, _args) -> None:
        if not self.complete:
            grouped = self.grouped
            self._trace = GroupTrace(self.layer, {n: w for n, w in self.linears.items() if n not in grouped})

    def _finish(self, _layer, _args, _output) -> None:
        if self._trace is not None:
            self.groups += self._trace.close()
            self._trace = None

    def close(self) -> None:
        """Remove the hooks (a call cut short still contributes what it traced)."""
        for handle in self.handles:
            handle.remove()
        self._finish(None, None, None)

    def warn_unseen(self) -> None:
        unseen = set(self.linears) - self.grouped
        if unseen:
            logger.warning("no calibration batch reached %s; they are left as max calibration set them",
                           sorted(unseen))


class GroupTrace:
    """Hooks that watch calls of ``layer`` until :meth:`close`, which groups ``linears`` by input tensor
    and finds each group's norm. The traced tensors stay alive until then (so that storages are not
    reused); trace one call. Lets a caller trace inside a pass it runs anyway (SmoothQuant's)."""

    def __init__(self, layer: nn.Module, linears: dict[str, nn.Linear]) -> None:
        self.linears = linears
        self.seen_inputs: list[tuple[str, Tensor]] = []  # (name, input) for every leaf module and linear call
        self.norm_calls: list[tuple[nn.Module, Tensor, Tensor]] = []  # (norm, input, output)
        inside_linear = {id(m) for linear in quantized_linears(layer).values() for m in linear.modules()}
        self.handles = []
        for name, module in layer.named_modules():
            is_leaf = not any(True for _ in module.children())
            if name in linears or (is_leaf and id(module) not in inside_linear):
                self.handles.append(module.register_forward_pre_hook(
                    lambda _m, args, name=name: self.seen_inputs.append((name, args[0])) if args else None))
            if is_norm(module):
                self.handles.append(module.register_forward_hook(
                    lambda m, args, output: self.norm_calls.append((m, args[0], output)) if args else None))

    def close(self) -> list[InputGroup]:
        """Remove the hooks and return the groups of what was seen (empty if nothing ran)."""
        for handle in self.handles:
            handle.remove()
        groups: list[tuple[Tensor, InputGroup]] = []
        for name, x in self.seen_inputs:
            if name not in self.linears or any(name in group.linears for _, group in groups):
                continue
            shared = next((group for key, group in groups if same_tensor(key, x)), None)
            if shared is None:
                groups.append((x, InputGroup({name: self.linears[name]}, None)))
            else:
                shared.linears[name] = self.linears[name]
        for key, group in groups:
            producers = [(norm, x, output) for norm, x, output in self.norm_calls if same_tensor(output, key)]
            other_readers = [n for n, x in self.seen_inputs if n not in group.linears and same_tensor(x, key)]
            if len(producers) == 1 and not other_readers:
                norm, x, output = producers[0]
                group.norm, group.norm_rows = norm, (_first_rows(x), _first_rows(output))
        self.seen_inputs, self.norm_calls = [], []
        return [group for _, group in groups]


def _first_rows(x: Tensor) -> Tensor:
    """Up to ``FOLD_CHECK_ROWS`` rows (vectors along the last dim) of ``x``, as ``(1, rows, dim)``: the
    shape of one short sequence, which norms written for ``(batch, tokens, dim)`` accept too."""
    return x.detach().reshape(-1, x.shape[-1])[:FOLD_CHECK_ROWS].unsqueeze(0).clone()


def same_tensor(a: Tensor, b: Tensor) -> bool:
    return isinstance(a, Tensor) and isinstance(b, Tensor) and a.data_ptr() == b.data_ptr() and a.shape == b.shape


def check_unscaled(group: InputGroup, name_prefix: str = "") -> None:
    """ValueError if a linear of the group already has a pre_quant_scale (a model is smoothed once)."""
    for name, linear in group.linears.items():
        if any(q.pre_quant_scale is not None for q in tensor_quantizers(linear.input_quantizer)):
            raise ValueError(f"{name_prefix}{name}: input_quantizer already has a pre_quant_scale; smooth a model once")


def scale_weights(group: InputGroup, scale: Tensor) -> None:
    """``W[:, j] *= scale[j]`` for every linear of the group (float32 math, stored in the weight's dtype)."""
    with torch.no_grad():
        for linear in group.linears.values():
            linear.weight.copy_(linear.weight.float() * scale.to(linear.weight.device))


def fold_into_norm(norm: nn.Module, scale: Tensor) -> dict[str, Tensor]:
    """``norm.weight /= scale`` and ``norm.bias /= scale`` (where present), float32 math; returns the
    original values for :func:`restore_norm`."""
    originals = {}
    with torch.no_grad():
        for name in ("weight", "bias"):
            parameter = getattr(norm, name, None)
            if isinstance(parameter, Tensor):
                originals[name] = parameter.detach().clone()
                parameter.copy_(parameter.float() / scale.to(parameter.device))
    return originals


def restore_norm(norm: nn.Module, originals: dict[str, Tensor]) -> None:
    """Undo :func:`fold_into_norm` exactly."""
    with torch.no_grad():
        for name, value in originals.items():
            getattr(norm, name).copy_(value)


def set_pre_quant_scale(group: InputGroup, scale: Tensor) -> None:
    """``input_quantizer.pre_quant_scale = 1/scale`` (float32) on every linear of the group."""
    for linear in group.linears.values():
        quantizer = tensor_quantizers(linear.input_quantizer)[0]
        quantizer.pre_quant_scale = (1.0 / scale).float().to(linear.weight.device)


def relative_change(output: Tensor, reference: Tensor) -> float:
    """``||output - reference|| / ||reference||`` in float32 (what FOLD_TOLERANCE bounds)."""
    output, reference = output.float(), reference.float()
    return float((output - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float32).tiny))


def fold_keeps_output(group: InputGroup, scale: Tensor) -> bool:
    """After ``fold_into_norm(group.norm, scale)``: does the folded norm's output on the traced rows, times
    ``scale``, match the traced output (relative change <= ``FOLD_TOLERANCE``)?"""
    rows_in, rows_out = group.norm_rows
    with torch.no_grad():
        folded = group.norm(rows_in).float() * scale.to(rows_in.device)
    return relative_change(folded, rows_out) <= FOLD_TOLERANCE


def apply_input_scale(group: InputGroup, scale: Tensor, ranges: InputRanges | None = None) -> str:
    """Scale the group's weight columns by ``scale`` and its input by ``1/scale``; returns "folded" or
    "pre_quant_scale" (see the module docstring). The float function is unchanged. ``ranges`` (measured
    input ranges) follow the scaling."""
    check_unscaled(group)
    if ranges is not None:
        ranges.rescale(group.linears.values(), scale)
    scale_weights(group, scale)
    if group.norm is not None:
        originals = fold_into_norm(group.norm, scale)
        if fold_keeps_output(group, scale):
            return "folded"
        restore_norm(group.norm, originals)
    set_pre_quant_scale(group, scale)
    return "pre_quant_scale"
