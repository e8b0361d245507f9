"""Groups of quantizable weights reading one input tensor, found by tracing a block's call.

Llama: q, k, v read ``input_layernorm``'s output; gate, up read ``post_attention_layernorm``'s; GPT-2's
fused ``c_attn`` reads ``ln_1``'s alone. A call of the block runs with hooks (:class:`GroupTrace`):
every weight's input (``QuantizableWeight.observe_inputs``), every other leaf module's input and every
norm's output are recorded, and weights whose inputs are the same tensor (same storage and shape) form
a group. The group's ``norm`` is the norm that produced that tensor, when exactly one did and nothing
but the group reads it (the group's input scale may then fold into it). Fused MoE experts see a fresh
tensor of routed tokens each: every expert's projection is a group of its own, with no norm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor, nn

from lowbit.structure.inputs import LayerInputs
from lowbit.structure.weights import QuantizableWeight, quantizable_weights

FOLD_CHECK_ROWS = 64
logger = logging.getLogger(__name__)


@dataclass
class InputGroup:
    """Weights sharing one input; ``norm`` is the module that produced it, if a norm did, and
    ``norm_rows`` up to ``FOLD_CHECK_ROWS`` rows of that norm's traced (input, output), ``(1, rows, dim)``."""

    linears: dict[str, QuantizableWeight]
    norm: nn.Module | None
    norm_rows: tuple[Tensor, Tensor] | None = None

    @property
    def first(self) -> QuantizableWeight:
        return next(iter(self.linears.values()))


def is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, Tensor) and weight.dim() == 1


def find_input_groups(layer: nn.Module, inputs: LayerInputs) -> list[InputGroup]:
    """The block's weights (those that read rows) grouped by shared input, in execution order.

    Batches are traced one at a time until every weight was called (MoE experts may skip a batch);
    a weight no batch reaches is in no group.
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


def row_weights(layer: nn.Module) -> dict[str, QuantizableWeight]:
    """The records of ``layer`` whose inputs are rows (``reads_rows``): what input groups are made of."""
    return {name: weight for name, weight in quantizable_weights(layer).items() if weight.reads_rows}


class GroupTracer:
    """Hooks on ``layer`` that trace each of its calls (a :class:`GroupTrace` of the weights not grouped
    yet) until every one is in a group, or until :meth:`close`; ``groups`` in execution order."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.linears = row_weights(layer)
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

    def __init__(self, layer: nn.Module, linears: dict[str, QuantizableWeight]) -> None:
        self.linears = linears
        self.seen_inputs: list[tuple[str, Tensor]] = []  # (name, input) for every leaf module and weight call
        self.norm_calls: list[tuple[nn.Module, Tensor, Tensor]] = []  # (norm, input, output)
        holders = {id(w.module) for w in quantizable_weights(layer).values()}
        inside_weights = {id(sub) for module in layer.modules() if id(module) in holders for sub in module.modules()}
        self.handles = [weight.observe_inputs(lambda x, name=name: self.seen_inputs.append((name, x)))
                        for name, weight in linears.items()]
        for name, module in layer.named_modules():
            if not any(True for _ in module.children()) and id(module) not in inside_weights:
                self.handles.append(module.register_forward_pre_hook(
                    lambda _m, args, name=name: self.seen_inputs.append((f"leaf {name}", args[0])) if args else None))
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
