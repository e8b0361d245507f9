"""Quantizable weights: one record per 2-D weight matrix an algorithm works on, and the registry of kinds.

A *record* (:class:`QuantizableWeight`) is what SmoothQuant, AWQ, GPTQ and scale estimation see of a
weight, whatever module holds it:

- ``weight``: the matrix ``(out, in)`` as its weight quantizer sees it, a view: ``weight.copy_(new)``
  under ``no_grad`` writes the parameter (transformers' ``Conv1D`` stores ``(in, out)``: its record's
  view is the transpose, the one place that transpose is handled for algorithms);
- ``weight_quantizer`` quantizes exactly that matrix; ``input_quantizer`` quantizes the rows ``(..., in)``
  the matrix multiplies (its ``pre_quant_scale`` has shape ``(in,)``);
- ``observe_inputs(callback)``: ``callback(x)`` for every input ``x`` ``(..., in)`` of the matrix, raw
  (before the input quantizer), as a hook with ``.remove()``; the callback may raise to cut the forward short.

A *kind* maps a quantized module to its records (:func:`register_weight_kind`): nn.Linear, Conv1D and
nn.Conv* are built in; fused 3-D MoE experts register one record per (projection, expert). Records
compare by (module, key), so they serve as dict keys across lookups.

Separately, every quantized class says which tensor each of its weight quantizer slots sees
(:func:`weights_by_slot`, from the class's ``weight_slots()``): weight calibration, folding and the
float-left summary read that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from lowbit.modules.registry import QuantModuleMixin, is_quantized, quantized_class_for

InputCallback = Callable[[Tensor], None]


@dataclass(frozen=True, eq=True)
class QuantizableWeight:
    """One weight matrix of a quantized module (module docstring); this base is a module with ``weight``
    ``(out, in)``, ``weight_quantizer`` and ``input_quantizer`` (nn.Linear)."""

    name: str = field(compare=False)
    module: nn.Module
    key: tuple = ()
    kind = "linear"
    reads_rows = True  # inputs are rows (..., in) of what ``weight`` multiplies

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def weight_quantizer(self) -> nn.Module:
        return self.module.weight_quantizer

    @property
    def input_quantizer(self) -> nn.Module:
        return self.module.input_quantizer

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def observe_inputs(self, callback: InputCallback):
        """``callback(x)`` with the module's input before each call; returns the hook handle."""
        return self.module.register_forward_pre_hook(lambda _module, args: callback(args[0]) if args else None)


class TransposedWeight(QuantizableWeight):
    """transformers' ``Conv1D`` (GPT-2): stored ``(in, out)``; the record's matrix is the ``(out, in)`` view."""

    kind = "transposed"

    @property
    def weight(self) -> Tensor:
        return self.module.weight.t()


class ConvWeight(QuantizableWeight):
    """nn.Conv* / nn.ConvTranspose*: the weight as stored; inputs are feature maps, not rows, so the
    data-aware algorithms leave it to max calibration."""

    kind = "conv"
    reads_rows = False


@dataclass(frozen=True)
class WeightKind:
    matches: Callable[[nn.Module], bool]
    records: Callable[[str, nn.Module], list[QuantizableWeight]]


WEIGHT_KINDS: list[WeightKind] = []


def register_weight_kind(matches: Callable[[nn.Module], bool],
                         records: Callable[[str, nn.Module], list[QuantizableWeight]]) -> None:
    """Make ``records(name, module)`` the weights of every quantized module for which ``matches(module)``;
    kinds registered later are tried first."""
    WEIGHT_KINDS.insert(0, WeightKind(matches, records))


def is_hf_conv1d(module: nn.Module) -> bool:
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
               for cls in type(module).__mro__)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
register_weight_kind(lambda m: isinstance(m, nn.Linear), lambda name, m: [QuantizableWeight(name, m)])
register_weight_kind(lambda m: isinstance(m, _CONVS), lambda name, m: [ConvWeight(name, m)])
register_weight_kind(is_hf_conv1d, lambda name, m: [TransposedWeight(name, m)])


def weight_records(name: str, module: nn.Module) -> list[QuantizableWeight]:
    """The records of one quantized module (none for a module no kind matches)."""
    if not is_quantized(module):
        return []
    for kind in WEIGHT_KINDS:
        if kind.matches(module):
            return kind.records(name, module)
    return []


def quantizable_weights(root: nn.Module, enabled_only: bool = False) -> dict[str, QuantizableWeight]:
    """Every record inside ``root`` (``root`` included), by name relative to ``root``, in definition order.
    ``enabled_only``: only those whose weight quantizer is enabled."""
    found = {}
    for name, module in root.named_modules():
        for record in weight_records(name, module):
            if not enabled_only or record.weight_quantizer.is_enabled:
                found[record.name] = record
    return found


def weights_by_slot(module: nn.Module, quantized_cls: type | None = None) -> dict[str, Tensor]:
    """{weight quantizer slot: the tensor that quantizer sees} of a quantized module, or of a module
    before its conversion to ``quantized_cls``: that class's ``weight_slots()`` (``QuantModuleMixin``'s,
    ``weight`` as stored, for a registered class without one); {} for a module without weights."""
    cls = quantized_cls or type(module)
    return getattr(cls, "weight_slots", QuantModuleMixin.weight_slots)(module)


def is_weight_module(module: nn.Module) -> bool:
    """Does ``module`` hold weights itself, quantized or (by its registered class) quantizable?"""
    cls = type(module) if is_quantized(module) else quantized_class_for(module)
    return cls is not None and bool(weights_by_slot(module, cls))
