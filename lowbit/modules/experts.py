"""Quantized fused MoE experts (transformers 5: Mixtral, Qwen2-MoE, Qwen3-MoE and every experts class
decorated with ``transformers.integrations.use_experts_implementation``).

Such a class keeps its experts as 3-D Parameters, ``gate_up_proj (E, 2I, H)`` (``up_proj (E, I, H)``
without a gate) and ``down_proj (E, H, I)`` (``(E, in, out)`` when ``is_transposed``), and runs each
expert on the tokens routed to it. The quantized class has four quantizers, ModelOpt's names:
``{gate_up_proj,down_proj}_{input,weight}_quantizer`` (``up_proj_*`` without a gate), each an
:class:`~lowbit.expert_quantizer.ExpertQuantizer` (state stacked per expert). Its forward is
transformers' eager one with the weights and inputs quantized; for each expert ``e`` hit by the router,
with ``T_e`` its routed tokens and ``p`` their routing weights::

    h   = act_gate(input_q(x[T_e], e) @ weight_q(gate_up_proj)[e]^T (+ bias[e]))
    out[T_e] += p * (input_q(h, e) @ weight_q(down_proj)[e]^T (+ bias[e]))

``act_gate`` is the class's ``_apply_gate`` (or ``act_fn`` without a gate); the optional post-expert
norm applies before ``p``. Each weight is fake-quantized once per forward, all experts together.

Observers (``add_input_observer``) see every expert's routed input, for AWQ / GPTQ per expert; the
structure layer's records of the experts are :class:`ExpertWeight` (one per projection and expert). With
``calibrate_all_experts`` on (``routing_all_tokens``), a forward first runs every expert on every token
for statistics only (input quantizers in calibration mode and observers see them), then computes the
routed output with statistics paused: the output is the one the router chose.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from lowbit.expert_quantizer import ExpertQuantizer, per_expert, quantize_expert_input
from lowbit.modules.registry import QUANT_MODULE_REGISTRY, QuantModuleMixin, register
from lowbit.quantizer import SequentialQuantizer, TensorQuantizer

InputObserver = Callable[[str, int, torch.Tensor], None]


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with 3-D expert Parameters (``use_experts_implementation``)."""
    if not all(hasattr(module, flag) for flag in ("has_gate", "is_transposed", "has_bias", "num_experts")):
        return False
    names = _projections(module.has_gate)
    return all(isinstance(getattr(module, n, None), nn.Parameter) and getattr(module, n).dim() == 3 for n in names)


def _projections(has_gate: bool) -> tuple[str, str]:
    return ("gate_up_proj" if has_gate else "up_proj", "down_proj")


def expert_projections(module: nn.Module) -> tuple[str, str]:
    """The names of a fused-experts module's 3-D weights: (``gate_up_proj`` or ``up_proj``, ``down_proj``)."""
    return _projections(module.has_gate)


class RoutedExpertsMixin:
    """transformers' eager experts loop over ``_weights()`` and ``_linear()``, which subclasses define: fake
    quantization here, packed storage in ``lowbit.compress.experts``."""

    projections: tuple[str, str]

    def _weights(self) -> dict:
        raise NotImplementedError

    def _linear(self, projection: str, expert: int, x: torch.Tensor, weights: dict) -> torch.Tensor:
        raise NotImplementedError

    def _bias(self, projection: str, expert: int) -> torch.Tensor | None:
        return getattr(self, f"{projection}_bias")[expert] if self.has_bias else None

    def _expert_mlp(self, expert: int, x: torch.Tensor, weights: dict) -> torch.Tensor:
        """One expert on its tokens ``x`` (tokens_e, H), before the routing weight."""
        first, down = self.projections
        hidden = self._linear(first, expert, x, weights)
        hidden = self._apply_gate(hidden) if self.has_gate else self.act_fn(hidden)
        out = self._linear(down, expert, hidden, weights)
        return self.post_expert_norm(out) if self.has_post_expert_norm else out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return self._routed(hidden_states, top_k_index, top_k_weights, self._weights())

    def _routed(self, hidden_states, top_k_index, top_k_weights, weights) -> torch.Tensor:
        """transformers' eager loop: experts in index order, tokens ordered by (top-k slot, token)."""
        final = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:  # expert-parallel sentinel
                continue
            top_k_pos, token_idx = torch.where(top_k_index.t() == expert)
            out = self._expert_mlp(expert, hidden_states[token_idx], weights)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


class QuantExpertsMixin(QuantModuleMixin, RoutedExpertsMixin):
    """Per-expert quantizers and the quantized routed forward (see the module docstring)."""

    stacked_weights = True  # weight_slots() are (E, out, in); each expert is quantized alone

    def _setup(self) -> None:
        self._input_observers: OrderedDict[int, InputObserver] = OrderedDict()  # weakref-able, for the handles
        self.calibrate_all_experts = False
        super()._setup()

    def __setattr__(self, name: str, value) -> None:
        # Whoever sets a slot (quantize, checkpoint restore, compress loading) sets a per-tensor quantizer:
        # give it the expert axis here, once for all of them.
        if name in type(self).quantizer_names and isinstance(value, (TensorQuantizer, SequentialQuantizer)):
            value = per_expert(value, self.num_experts)
        super().__setattr__(name, value)

    # ---- weights ------------------------------------------------------------------------------------
    def expert_weight(self, projection: str) -> torch.Tensor:
        """The ``(E, out, in)`` weight of ``projection`` as its quantizer sees it (a view of the Parameter)."""
        weight = getattr(self, projection)
        return weight.transpose(-1, -2) if self.is_transposed else weight

    def weight_slots(self) -> dict[str, torch.Tensor]:
        """{weight quantizer slot: its ``(E, out, in)`` weight} (``lowbit.convert.weights_by_slot``; also called
        on the original module before conversion)."""
        return {f"{p}_weight_quantizer": QuantExpertsMixin.expert_weight(self, p) for p in _projections(self.has_gate)}

    def quantized_expert_weight(self, projection: str) -> torch.Tensor:
        """``(E, out, in)`` fake-quantized weight of ``projection``."""
        return getattr(self, f"{projection}_weight_quantizer")(self.expert_weight(projection))

    # ---- inputs -------------------------------------------------------------------------------------
    def add_input_observer(self, observer: InputObserver) -> RemovableHandle:
        """``observer(projection, expert, x)`` sees each expert's routed input ``x`` (tokens_e, in), raw (before
        the input quantizer), until the returned handle's ``remove()``; its exceptions propagate."""
        handle = RemovableHandle(self._input_observers)
        self._input_observers[handle.id] = observer
        return handle

    def _expert_input(self, projection: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        for observer in list(self._input_observers.values()):
            observer(projection, expert, x)
        return quantize_expert_input(getattr(self, f"{projection}_input_quantizer"), x, expert)

    # ---- forward ------------------------------------------------------------------------------------
    def _linear(self, projection: str, expert: int, x: torch.Tensor, weights: dict) -> torch.Tensor:
        x = self._expert_input(projection, expert, x)
        return F.linear(x, weights[projection][expert], self._bias(projection, expert))

    def _weights(self) -> dict[str, torch.Tensor]:
        return {projection: self.quantized_expert_weight(projection) for projection in self.projections}

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        weights = self._weights()
        if self.calibrate_all_experts:
            with torch.no_grad():
                for expert in range(self.num_experts):
                    self._expert_mlp(expert, hidden_states, weights)
            with self._statistics_paused():
                return self._routed(hidden_states, top_k_index, top_k_weights, weights)
        return self._routed(hidden_states, top_k_index, top_k_weights, weights)

    @contextmanager
    def _statistics_paused(self) -> Iterator[None]:
        """Input quantizers stop collecting and observers stop seeing inputs while the block runs."""
        stages = [s for p in self.projections for s in _stages(getattr(self, f"{p}_input_quantizer"))]
        collecting = [stage._calib for stage in stages]
        observers = dict(self._input_observers)
        self._input_observers.clear()
        for stage in stages:
            stage._calib = False
        try:
            yield
        finally:
            self._input_observers.update(observers)
            for stage, was in zip(stages, collecting, strict=True):
                stage._calib = was


def _stages(quantizer) -> list[TensorQuantizer]:
    return list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]


def register_fused_experts(module: nn.Module) -> bool:
    """Register a quantized class for this fused-experts class (once); False if it is not one."""
    cls = type(module)
    if cls in QUANT_MODULE_REGISTRY:
        return True
    if not is_fused_experts(module):
        return False
    projections = _projections(module.has_gate)
    names = tuple(f"{p}_{kind}_quantizer" for p in projections for kind in ("input", "weight"))
    attributes = {"__module__": __name__, "projections": projections, "quantizer_names": names}
    register(original_cls=cls, quantized_cls=type(f"Quant{cls.__name__}", (QuantExpertsMixin, cls), attributes))
    return True


@contextmanager
def routing_all_tokens(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """``calibrate_all_experts``: every quantized experts module in ``model`` runs all experts on all tokens
    for statistics while the block runs (outputs unchanged; see the module docstring)."""
    modules = [m for m in model.modules() if isinstance(m, QuantExpertsMixin)] if enabled else []
    for module in modules:
        module.calibrate_all_experts = True
    try:
        yield
    finally:
        for module in modules:
            module.calibrate_all_experts = False


def warn_starved_experts(model: nn.Module) -> list[str]:
    """One warning per expert input quantizer whose last calibration left experts without a token (they took
    their siblings' largest amax); returns the quantizer names. Clears the record."""
    named = []
    for name, module in model.named_modules():
        if not isinstance(module, QuantExpertsMixin):
            continue
        for slot in module.quantizer_names:
            for stage in _stages(getattr(module, slot)):
                if isinstance(stage, ExpertQuantizer) and stage.starved_experts:
                    full = f"{name}.{slot}" if name else slot
                    warnings.warn(
                        f"{full}: expert(s) {stage.starved_experts} of {stage.num_experts} received no "
                        "calibration token; their amax is the largest of their siblings' (pass "
                        "algorithm={'method': ..., 'calibrate_all_experts': True} to calibrate every expert)",
                        stacklevel=2,
                    )
                    stage.starved_experts = []
                    named.append(full)
    return named
