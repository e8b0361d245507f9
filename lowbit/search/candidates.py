"""What auto_quantize chooses among, and for which modules: the formats, the searched modules, the groups.

- A *format* is a lowbit/ModelOpt config (a preset name such as ``"NVFP4_DEFAULT_CFG"`` or ``"nvfp4"``, or a
  dict), validated once. As in ModelOpt's ``auto_quantize``, its rules are matched against a searched module's
  own quantizer slots (``weight_quantizer``, ``input_quantizer``), not the full name: a preset's
  ``"*lm_head*": {"enable": False}`` does not keep the head out of the search; ``disabled_layers`` does.
  "Not quantized" (:data:`NONE`, 16 bits) is always a candidate besides the formats given.
- The *searched modules* are those holding quantizable weights (``lowbit.structure.weights``), less those
  matching ``disabled_layers`` (wildcards on the module name; by default MoE routers and gates, which
  presets keep in high precision).
- A *decision group* is a set of modules that take one choice: the weights a serving engine fuses. They
  are found by tracing (``lowbit.structure.groups``): weights reading the same input tensor (q/k/v,
  gate/up) join, as do the experts of one MoE layer (one fused experts module, or ``<prefix>.experts.<i>.``
  modules under one prefix).
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lowbit.config import QuantizeConfig, QuantizeRule, parse_config
from lowbit.presets import PRESETS, get_preset
from lowbit.structure.groups import GroupTrace, row_weights
from lowbit.structure.weights import is_weight_module

NONE = "none"
DEFAULT_DISABLED_LAYERS = ("*router*", "*block_sparse_moe.gate", "*mlp.gate", "*shared_expert_gate")
EXPERT_NAME = re.compile(r"^(.*\.experts)\.\d+(\..*)?$")


@dataclass(frozen=True)
class SearchFormat:
    """One candidate format: its name (the preset's, or ``custom_<i>``), the config as given, parsed."""

    name: str
    config: dict
    parsed: QuantizeConfig

    @classmethod
    def parse(cls, name: str, config: dict) -> SearchFormat:
        """Validate ``config`` (errors name the format)."""
        try:
            return cls(name, config, parse_config(config))
        except (TypeError, ValueError) as error:
            raise type(error)(f"format {name}: {error}") from None

    def for_modules(self, modules: set[str]) -> QuantizeConfig:
        """The format's rules matched against each quantizer's slot, only inside ``modules``; every other
        quantizer off (the module docstring)."""
        rules = [QuantizeRule("*", {"enable": False})]
        rules += [QuantizeRule(SlotMatch(rule.pattern, frozenset(modules)), rule.attributes, rule.parent_class)
                  for rule in self.parsed.rules]
        return QuantizeConfig(tuple(rules), self.parsed.algorithm, self.parsed.algorithm_options)


@dataclass(frozen=True)
class SlotMatch:
    """A rule pattern applied to a quantizer's slot name (``weight_quantizer``) inside ``modules`` only; a
    callable pattern still gets the full name."""

    pattern: str | Callable[[str], bool]
    modules: frozenset[str]

    def __call__(self, quantizer_name: str) -> bool:
        module, _, slot = quantizer_name.rpartition(".")
        if module not in self.modules:
            return False
        if callable(self.pattern):
            return bool(self.pattern(quantizer_name))
        return fnmatch.fnmatchcase(slot, self.pattern)


def search_formats(quantization_formats) -> list[SearchFormat]:
    """Validate ``quantization_formats`` (a non-empty list of preset names or config dicts) into formats."""
    if not isinstance(quantization_formats, (list, tuple)) or not quantization_formats:
        raise ValueError(f"quantization_formats={quantization_formats!r}: expected a non-empty list of preset "
                         f"names (e.g. 'NVFP4_DEFAULT_CFG', 'fp8') or config dicts")
    formats, names = [], set()
    for index, entry in enumerate(quantization_formats):
        if isinstance(entry, str):
            name = preset_name(entry)
            config = get_preset(name)
        elif isinstance(entry, dict):
            name = next((key for key, preset in PRESETS.items() if preset == entry), f"custom_{index}")
            config = copy.deepcopy(entry)
        else:
            raise TypeError(f"quantization_formats[{index}]={entry!r}: expected a preset name or a config dict")
        if name in names:
            raise ValueError(f"quantization_formats[{index}]: format {name} is listed twice")
        names.add(name)
        formats.append(SearchFormat.parse(name, config))
    return formats


def preset_name(name: str) -> str:
    """The preset a format name means: the name itself (``INT4_AWQ``, ``int4_awq_cfg``) or its ``_DEFAULT``
    preset (``nvfp4`` -> ``NVFP4_DEFAULT_CFG``); ValueError naming the allowed presets otherwise."""
    base = name.upper().removesuffix("_CFG")
    for key in (f"{base}_CFG", f"{base}_DEFAULT_CFG"):
        if key in PRESETS:
            return key
    raise ValueError(f"format {name!r} is unknown; allowed are {sorted(PRESETS)} (case-insensitive, '_CFG' and "
                     "'_DEFAULT' optional)")


def searched_modules(model: nn.Module, disabled_layers=DEFAULT_DISABLED_LAYERS) -> tuple[list[str], list[str]]:
    """(searched, disabled): names of the modules holding quantizable weights, split by ``disabled_layers``
    (one wildcard or a list of them, on module names)."""
    patterns = [disabled_layers] if isinstance(disabled_layers, str) else list(disabled_layers or ())
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"disabled_layers={disabled_layers!r}: expected a wildcard string or a list of them")
    searched, disabled = [], []
    for name, module in model.named_modules():
        if name and is_weight_module(module):
            (disabled if any(fnmatch.fnmatchcase(name, p) for p in patterns) else searched).append(name)
    return searched, disabled


def decision_groups(model: nn.Module, modules: list[str], run_batch: Callable[[nn.Module], None]) -> list[list[str]]:
    """The searched ``modules`` (already quantized) partitioned into decision groups, in model order.

    One batch (``run_batch(model)``) is traced over the whole model (``lowbit.structure.groups.GroupTrace``):
    modules whose weights read one input tensor join; so do the experts of one MoE layer. A module no
    batch reaches stays a group of its own.
    """
    with GroupTracing(model, modules) as tracing:
        run_batch(model)
    return tracing.groups


class GroupTracing:
    """:func:`decision_groups` around a batch the caller runs (one it runs anyway, such as the first score
    batch): ``with tracing: <a forward>``, then ``tracing.groups``."""

    def __init__(self, model: nn.Module, modules: list[str]) -> None:
        self.model, self.modules = model, modules
        self.groups: list[list[str]] | None = None
        self._trace: GroupTrace | None = None
        self._owner: dict[int, str] = {}

    def __enter__(self) -> GroupTracing:
        wanted = set(self.modules)
        self._owner = {id(module): name for name, module in self.model.named_modules() if name in wanted}
        weights = {name: w for name, w in row_weights(self.model).items() if id(w.module) in self._owner}
        self._trace = GroupTrace(self.model, weights)
        return self

    def __exit__(self, exc_type, *_) -> None:
        input_groups = self._trace.close()
        if exc_type is None:
            self.groups = _partition(self.modules, [[self._owner[id(w.module)] for w in group.linears.values()]
                                                    for group in input_groups])


def _partition(modules: list[str], input_groups: list[list[str]]) -> list[list[str]]:
    """``modules`` split into the unions of ``input_groups`` and of each MoE layer's experts, in model order."""
    parent = {name: name for name in modules}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def join(names: list[str]) -> None:
        for other in names[1:]:
            parent[find(other)] = find(names[0])

    for names in input_groups:
        join(names)
    experts: dict[str, list[str]] = {}
    for name in modules:
        match = EXPERT_NAME.match(name)
        if match:
            experts.setdefault(match.group(1), []).append(name)
    for names in experts.values():
        join(names)
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(find(name), []).append(name)
    return list(groups.values())
