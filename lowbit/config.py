"""The quantization config: rules from quantizer-name wildcards to attributes, plus an algorithm.

Accepted shapes (validated here, once, into a ``QuantizeConfig``):

1. ModelOpt's dict: ``{"quant_cfg": {"*weight_quantizer": {...}, "*lm_head*": {"enable": False},
   "default": {"enable": False}}, "algorithm": "max"}``. Keys are ``fnmatch`` wildcards on a
   quantizer's full name (``model.layers.0.mlp.up_proj.weight_quantizer``), callables
   ``name -> bool``, or ``"nn.<Class>"`` with a nested dict that applies only inside modules of that
   class. ``"default"`` applies first, then the rules in order; a later rule's attributes override
   an earlier one's, attribute by attribute. A list value makes a SequentialQuantizer.
2. ModelOpt 0.4x's ordered list: ``"quant_cfg": [{"quantizer_name": "*", "enable": False},
   {"quantizer_name": "*weight_quantizer", "cfg": {...}, "parent_class": "nn.Linear"}]``.
3. A ``QuantizeConfig`` built in code.

lowbit differs from ModelOpt in one place, on purpose: a quantizer that no rule names stays disabled.
``algorithm`` is a method name or ``{"method": name, **options}``; ``None`` skips calibration. Every
method takes ``calibrate_all_experts`` (bool, default False): fused MoE experts see every calibration token,
and ``rotate`` (False, True, "quarot", "spinquant" or a dict; ``lowbit.rotation.options``): QuaRot's or
SpinQuant's rotations are fused into the model's weights before it calibrates.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowbit.algorithms.registry import ALGORITHMS, check_options
from lowbit.attributes import QuantizerAttributeConfig, check_type
from lowbit.rotation.options import check_rotation_options

Pattern = str | Callable[[str], bool]
ALGORITHM_METHODS = ALGORITHMS.keys()  # a live view: register_algorithm adds to it
COMMON_OPTIONS = ("calibrate_all_experts", "rotate")  # options every method takes


@dataclass(frozen=True)
class QuantizeRule:
    """Attributes (a partial dict, or a list of dicts for a SequentialQuantizer) for matching quantizers."""

    pattern: Pattern
    attributes: dict | list
    parent_class: str | None = None

    def matches(self, quantizer_name: str, parent_classes: tuple[str, ...]) -> bool:
        if self.parent_class is not None and self.parent_class not in parent_classes:
            return False
        if callable(self.pattern):
            return bool(self.pattern(quantizer_name))
        return fnmatch.fnmatchcase(quantizer_name, self.pattern)


@dataclass(frozen=True)
class QuantizeConfig:
    rules: tuple[QuantizeRule, ...]
    algorithm: str | None = "max"
    algorithm_options: dict = field(default_factory=dict)

    def attributes_for(self, quantizer_name: str, parent_classes: tuple[str, ...]):
        """Merged attributes for one quantizer: a QuantizerAttributeConfig, a list of them, or None (off)."""
        merged: dict | list | None = None
        for rule in self.rules:
            if not rule.matches(quantizer_name, parent_classes):
                continue
            attributes = rule.attributes
            if isinstance(attributes, list) or set(attributes) - {"enable"}:
                merged = copy.deepcopy(attributes)  # a format rule replaces all attributes
            elif isinstance(merged, list):
                merged = [{**entry, **attributes} for entry in merged]
            else:
                merged = {**(merged or {}), **attributes}  # an enable-only rule toggles
        if merged is None:
            return None
        if isinstance(merged, list):
            configs = [QuantizerAttributeConfig.from_dict(entry) for entry in merged]
            return configs if any(c.enable for c in configs) else None
        config = QuantizerAttributeConfig.from_dict(merged)
        return config if config.enable else None

    def unmatched_patterns(self, names_with_parents: list[tuple[str, tuple[str, ...]]]) -> list[str]:
        """String patterns that would switch a quantizer on but name none (usually a typo).

        Rules that only disable (``{"enable": False}``, as presets carry for other architectures'
        routers and heads) are not reported.
        """
        return [
            rule.pattern
            for rule in self.rules
            if isinstance(rule.pattern, str)
            and rule.attributes != {"enable": False}
            and not any(rule.matches(name, parents) for name, parents in names_with_parents)
        ]


def _class_name(key: str) -> str:
    return key.split(".", 1)[1]


def _check_attributes(where: str, attributes: Any) -> dict | list:
    """``attributes`` (a bool means ``{"enable": bool}``) after validating every entry as a full attribute set,
    with ``quant_cfg[where]`` in front of any error."""
    if isinstance(attributes, bool):
        return {"enable": attributes}
    entries = attributes if isinstance(attributes, list) else [attributes]
    for entry in entries:
        if not isinstance(entry, dict):
            raise TypeError(f"quant_cfg[{where!r}]={attributes!r}: expected a dict of quantizer attributes")
        try:
            check_type("enable", entry.get("enable", True), bool)
            if set(entry) - {"enable"}:  # an enable-only entry toggles; anything else must be complete
                QuantizerAttributeConfig.from_dict({**entry, "enable": True})
        except (TypeError, ValueError) as error:
            raise type(error)(f"quant_cfg[{where!r}]: {error}") from None
    return attributes


def _rules_from_dict(quant_cfg: dict) -> list[QuantizeRule]:
    default_rules, rules = [], []
    for key, value in quant_cfg.items():
        if key == "default":
            default_rules.append(QuantizeRule("*", _check_attributes(key, value)))
        elif isinstance(key, str) and key.startswith("nn."):
            if not isinstance(value, dict):
                raise TypeError(f"quant_cfg[{key!r}]: a module-class key takes a dict of wildcard rules")
            for pattern, attributes in value.items():
                if not (isinstance(pattern, str) or callable(pattern)):
                    raise TypeError(f"quant_cfg[{key!r}] key {pattern!r}: expected a wildcard string or a callable")
                rules.append(QuantizeRule(pattern, _check_attributes(f"{key}/{pattern}", attributes),
                                          _class_name(key)))
        elif isinstance(key, str) or callable(key):
            rules.append(QuantizeRule(key, _check_attributes(str(key), value)))
        else:
            raise TypeError(f"quant_cfg key {key!r}: expected a wildcard string, a callable or 'nn.<Class>'")
    return default_rules + rules


def _rules_from_list(quant_cfg: list) -> list[QuantizeRule]:
    rules = []
    for index, entry in enumerate(quant_cfg):
        if not isinstance(entry, dict) or "quantizer_name" not in entry:
            raise ValueError(f"quant_cfg[{index}]={entry!r}: each entry needs a 'quantizer_name'")
        unknown = set(entry) - {"quantizer_name", "cfg", "enable", "parent_class"}
        if unknown:
            raise ValueError(
                f"quant_cfg[{index}] has unknown key(s) {sorted(unknown)}; allowed are "
                "quantizer_name, cfg, enable, parent_class"
            )
        name, parent = entry["quantizer_name"], entry.get("parent_class")
        if not (isinstance(name, str) or callable(name)):
            raise TypeError(f"quant_cfg[{index}]['quantizer_name']={name!r}: expected a wildcard string or a callable")
        if not (parent is None or isinstance(parent, str)):
            raise TypeError(f"quant_cfg[{index}]['parent_class']={parent!r}: expected a class name such as 'nn.Linear'")
        attributes = _check_attributes(str(index), copy.deepcopy(entry.get("cfg", {})))
        if "enable" in entry:
            enable = check_type(f"quant_cfg[{index}]['enable']", entry["enable"], bool)
            attributes = ([{**a, "enable": enable} for a in attributes] if isinstance(attributes, list)
                          else {**attributes, "enable": enable})
        parent = _class_name(parent) if parent and parent.startswith("nn.") else parent
        rules.append(QuantizeRule(name, attributes, parent))
    return rules


def _parse_algorithm(algorithm: Any) -> tuple[str | None, dict]:
    if algorithm is None:
        return None, {}
    if isinstance(algorithm, str):
        method, options = algorithm, {}
    elif isinstance(algorithm, dict):
        if "method" not in algorithm:
            raise ValueError(f"algorithm={algorithm!r}: a dict needs a 'method' key")
        options = {k: v for k, v in algorithm.items() if k != "method"}
        method = algorithm["method"]
    else:
        raise TypeError(f"algorithm={algorithm!r}: expected a method name, a dict with 'method', or None")
    if method not in ALGORITHM_METHODS:
        raise ValueError(f"algorithm method {method!r} is unknown; allowed are {list(ALGORITHM_METHODS)}")
    check_calibrate_all_experts(options.get("calibrate_all_experts", False))
    check_rotation_options(options.get("rotate", False))
    check_options(method, {key: value for key, value in options.items() if key not in COMMON_OPTIONS})
    return method, options


def check_calibrate_all_experts(value: Any) -> None:
    """The ``calibrate_all_experts`` algorithm option (every method takes it; ``lowbit.modules.experts``)."""
    if not isinstance(value, bool):
        raise TypeError(f"algorithm option calibrate_all_experts={value!r}: expected True or False")


def parse_config(config: dict | QuantizeConfig) -> QuantizeConfig:
    """Validate a user config (any accepted shape) into a QuantizeConfig; errors name the key."""
    if isinstance(config, QuantizeConfig):
        return config
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict with 'quant_cfg' or a QuantizeConfig, got {type(config).__name__}")
    unknown = set(config) - {"quant_cfg", "algorithm"}
    if unknown:
        raise ValueError(f"config has unknown key(s) {sorted(unknown)}; allowed are 'quant_cfg', 'algorithm'")
    quant_cfg = config.get("quant_cfg")
    if isinstance(quant_cfg, dict):
        rules = _rules_from_dict(quant_cfg)
    elif isinstance(quant_cfg, list):
        rules = _rules_from_list(quant_cfg)
    else:
        raise ValueError(f"config['quant_cfg']={quant_cfg!r}: expected a dict of wildcard rules or a list")
    method, options = _parse_algorithm(config.get("algorithm", "max"))
    return QuantizeConfig(tuple(rules), method, options)
