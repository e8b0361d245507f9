"""Every searched module calibrated in every format, and switching a module among them in O(1).

Each format is calibrated with its own algorithm (``lowbit.quantize`` with the format's config restricted
to the searched modules: AWQ, GPTQ, SmoothQuant, max ... on the whole model at once, as ModelOpt does).
What a module then holds is kept as its :class:`ModuleState` for that format: the quantizer modules in its
slots, and the parameters the algorithm changed (AWQ scales weight columns, GPTQ rewrites the weight),
which are put back to float before the next format calibrates. The :data:`NONE` state is disabled
quantizers and the float parameters. Switching sets the slots and points the parameters' ``.data`` at the
kept tensors: no copy, no recalibration.

Memory: one float copy of the model's parameters while formats calibrate (to detect and undo changes),
plus one copy of each parameter a format's algorithm changed.
A format whose algorithm changes a parameter no searched module owns (a scale folded into a norm) cannot be
switched module by module: ValueError naming the format and the parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from lowbit.algorithms.layerwise import without_layer_errors
from lowbit.attributes import QuantizerAttributeConfig
from lowbit.convert import quantize
from lowbit.quantizer import TensorQuantizer, reusing_outputs
from lowbit.search.candidates import NONE, SearchFormat

ForwardLoop = Callable[[nn.Module], None]
AWQ_SCALE_SEARCHES = ("awq_lite", "awq_full")


@dataclass
class ModuleState:
    """What one module holds under one choice: ``slots`` {quantizer slot: quantizer module} and ``tensors``
    {parameter name: data} for the parameters that differ from float."""

    slots: dict[str, nn.Module]
    tensors: dict[str, Tensor]


class CalibratedModules:
    """The searched ``modules`` of ``model`` (names), each with its state per calibrated format."""

    def __init__(self, model: nn.Module, modules: list[str]) -> None:
        self.model = model
        self.modules = {name: model.get_submodule(name) for name in modules}
        self.states: dict[str, dict[str, ModuleState]] = {}  # format -> module -> state
        self.float_tensors: dict[str, dict[str, Tensor]] = {name: {} for name in modules}
        self.current: dict[str, str] = {}
        self._none: dict[str, ModuleState] = {}

    def calibrate(self, search_format: SearchFormat, forward_loop: ForwardLoop,
                  modules: list[str] | None = None, awq_loss_dtype: str | None = None) -> None:
        """Quantize ``modules`` (default: all searched) in ``search_format`` with its algorithm and keep each
        one's state; the parameters go back to float afterwards. ``awq_loss_dtype``: AWQ's ``loss_dtype``
        option for an AWQ scale search (``lowbit.algorithms.awq.search_awq_scale``), None: the format's own.
        An AWQ scale search runs without its identity candidate (``identity=False``: ModelOpt's awq_lite grid):
        on the one calibration batch auto_quantize gives AWQ, plain rounding won two of the bundled model's 57
        searches by 0.07-0.45 % of output MSE, and those two choices alone made the INT4 model's perplexity
        0.1 % worse than ModelOpt's at equal KL (bench/results/auto_quantize_modelopt_2026-12-07b.md)."""
        names = list(self.modules) if modules is None else modules
        snapshot = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        config = search_format.for_modules(set(names))
        if config.algorithm in AWQ_SCALE_SEARCHES:
            dtype = {} if awq_loss_dtype is None else {"loss_dtype": awq_loss_dtype}
            config = replace(config, algorithm_options={**config.algorithm_options, "identity": False, **dtype})
        with without_layer_errors():  # the per-layer error report of a layer-wise algorithm is not read here
            quantize(self.model, config, forward_loop)
        owners = {id(p): (module_name, param_name) for module_name in names
                  for param_name, p in self.modules[module_name].named_parameters(recurse=False)}
        states = {name: ModuleState({slot: getattr(self.modules[name], slot)
                                     for slot in self.modules[name].quantizer_names}, {}) for name in names}
        foreign = []
        with torch.no_grad():
            for full_name, parameter in self.model.named_parameters():
                original = snapshot[full_name]
                if torch.equal(parameter.detach(), original):
                    continue
                owner = owners.get(id(parameter))
                if owner is None:
                    foreign.append(full_name)
                else:
                    states[owner[0]].tensors[owner[1]] = parameter.detach().clone()
                    self.float_tensors[owner[0]].setdefault(owner[1], original)
                parameter.copy_(original)
        if foreign:
            raise ValueError(
                f"format {search_format.name}: its calibration ({search_format.parsed.algorithm}) changed "
                f"{foreign[:4]}, which no searched module owns (a scale folded into a norm?); auto_quantize "
                "switches formats module by module: use an algorithm that keeps its scales in the layer "
                "(e.g. awq_lite with scale_per_linear=True)")
        self.states[search_format.name] = states
        self.current = {}  # the model now holds the last format's quantizers: nothing is known to be applied

    def apply_module(self, name: str, choice: str) -> None:
        """Put module ``name`` in ``choice`` (a calibrated format or NONE)."""
        module = self.modules[name]
        if choice == NONE and name not in self._none:
            self._none[name] = _none_state(module)
        state = self._none[name] if choice == NONE else self.states[choice][name]
        for slot, quantizer in state.slots.items():
            setattr(module, slot, quantizer)
        for param_name, original in self.float_tensors[name].items():
            getattr(module, param_name).data = state.tensors.get(param_name, original)
        self.current[name] = choice

    def reusing_weights(self):
        """A context (under no_grad) in which each format's weight quantizers fake-quantize a weight once and
        reuse it (``lowbit.quantizer.reusing_outputs``): one kept copy of each quantized weight."""
        return reusing_outputs([quantizer for states in self.states.values() for state in states.values()
                                for slot, quantizer in state.slots.items() if slot.endswith("weight_quantizer")])

    def apply(self, assignment: dict[str, str]) -> None:
        """Every searched module in its assigned choice (missing ones: NONE); unchanged modules are skipped."""
        for name in self.modules:
            choice = assignment.get(name, NONE)
            if self.current.get(name) != choice:
                self.apply_module(name, choice)


def _none_state(module: nn.Module) -> ModuleState:
    """Disabled quantizers in every slot, float parameters."""
    device = next((p.device for p in module.parameters(recurse=False)), torch.device("cpu"))
    slots = {}
    for slot in module.quantizer_names:
        quantizer = TensorQuantizer(QuantizerAttributeConfig()).to(device)
        quantizer.disable()
        slots[slot] = quantizer
    return ModuleState(slots, {})
