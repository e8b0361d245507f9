"""``lowbit.plan(model, config)``: what ``quantize`` would do, computed before any weight is touched.

For every quantizer slot the config's rules are resolved exactly as ``quantize`` resolves them (its own
``_plan``: the same wildcard matching, block-size checks and errors), and each weight matrix of the model is
listed with the format it gets or why it stays float:

- ``rule '<pattern>' disables it`` (``*lm_head*``, routers, a user's rule) or ``no rule enables it`` (only
  ``default`` matched);
- ``embedding (quantize leaves embeddings to compress_weights)``;
- ``no quantized class for <Type>`` (a weight no registered kind covers).

Bytes: before = ``numel * element_size`` in the model's dtype; after = the packed size of a quantized matrix
(``lowbit.report.packed_weight_bits``: codes, scales, zero points, NVFP4's global scale) or, for a float one,
its bytes unchanged. Parameters of fewer than 2 dims (norms, biases) count unchanged in the totals.

The model may live on the ``meta`` device (``lowbit ptq --dry-run`` builds it from ``config.json`` alone, so
no weight is even read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from lowbit.config import QuantizeConfig, QuantizeRule, parse_config
from lowbit.convert import _plan as resolve_quantizers
from lowbit.modules.registry import is_quantized, quantized_class_for
from lowbit.report import packed_weight_bits
from lowbit.structure.weights import weights_by_slot

FLOAT = "float"


@dataclass(frozen=True)
class WeightPlan:
    """One weight matrix (or a stack of experts): its format after ``quantize`` and its bytes."""

    name: str
    shape: tuple[int, ...]
    format: str  # e.g. "int4 block[-1:128] static", or FLOAT
    rule: str | None  # the pattern whose attributes it takes, or the one that keeps it float
    reason: str | None  # why it stays float; None when quantized
    bytes_before: int
    bytes_after: int


@dataclass
class Plan:
    """The resolved plan: weights, rules with what they match, activation / KV quantizers, byte totals."""

    weights: list[WeightPlan]
    rule_matches: dict[str, list[str]]  # pattern -> quantizer names it decides (enables or disables)
    activations: dict[str, str]  # enabled non-weight quantizer name -> format
    other_bytes: int  # parameters of fewer than 2 dims, unchanged
    algorithm: str | None
    estimates: dict = field(default_factory=dict)  # filled by lowbit.ptq.memory for a run

    @property
    def bytes_before(self) -> int:
        return sum(w.bytes_before for w in self.weights) + self.other_bytes

    @property
    def bytes_after(self) -> int:
        return sum(w.bytes_after for w in self.weights) + self.other_bytes

    @property
    def quantized(self) -> list[WeightPlan]:
        return [w for w in self.weights if w.reason is None]

    @property
    def left_float(self) -> list[WeightPlan]:
        return [w for w in self.weights if w.reason is not None]

    def as_dict(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "weights": [vars(w) | {"shape": list(w.shape)} for w in self.weights],
            "rule_matches": self.rule_matches,
            "activations": self.activations,
            "estimates": self.estimates,
        }


def describe(configs) -> str:
    """``"int4 block[-1:128] static"``; stages of a sequential quantizer joined by ``" then "``."""
    stages = configs if isinstance(configs, list) else [configs]
    return " then ".join(f"{c.format_name} {c.granularity}" for c in stages if c.enable)


def deciding_rule(config: QuantizeConfig, name: str, parents: tuple[str, ...], enabled: bool) -> QuantizeRule | None:
    """The rule that decides ``name``: the last one that sets its format when it ends enabled, else the last
    one that disables it (None when no rule matches)."""
    matched = [rule for rule in config.rules if rule.matches(name, parents)]
    if enabled:
        return [r for r in matched if isinstance(r.attributes, list) or set(r.attributes) - {"enable"}][-1]
    off = [r for r in matched if not isinstance(r.attributes, list) and r.attributes.get("enable") is False]
    return (off or [None])[-1]


def _pattern(rule: QuantizeRule | None) -> str | None:
    if rule is None:
        return None
    return rule.pattern if isinstance(rule.pattern, str) else getattr(rule.pattern, "__name__", repr(rule.pattern))


def _float_reason(rule: QuantizeRule | None, config: QuantizeConfig) -> str:
    if rule is None or rule is config.rules[0] and rule.pattern == "*":
        return "no rule enables it"
    return f"rule {_pattern(rule)!r} disables it"


def _bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def plan(model: nn.Module, config: dict | QuantizeConfig) -> Plan:
    """The plan of ``quantize(model, config)`` (module docstring); the model is not changed.

    Raises what ``quantize`` would raise before converting (unknown keys, block sizes that do not divide a
    weight, ...), naming the quantizer.
    """
    config = parse_config(config)
    weights: list[WeightPlan] = []
    rule_matches: dict[str, list[str]] = {}
    activations: dict[str, str] = {}
    seen: set[int] = set()
    for name, module, slot, full_name, parents, attributes in resolve_quantizers(model, config):
        rule = deciding_rule(config, full_name, parents, attributes is not None)
        if rule is not None:
            rule_matches.setdefault(_pattern(rule), []).append(full_name)
        cls = type(module) if is_quantized(module) else quantized_class_for(module)
        slots = weights_by_slot(module, cls)
        if slot not in slots:
            if attributes is not None:
                activations[full_name] = describe(attributes)
            continue
        tensor = slots[slot]
        base = tensor if tensor._base is None else tensor._base
        seen.add(id(base))
        before = _bytes(tensor)
        if attributes is None:
            weights.append(WeightPlan(f"{name}.{slot}", tuple(tensor.shape), FLOAT, _pattern(rule),
                                      _float_reason(rule, config), before, before))
            continue
        configs = attributes if isinstance(attributes, list) else [attributes]
        stacked = getattr(cls, "stacked_weights", False)  # fused experts: each (out, in) packed alone
        bits = (tensor.shape[0] * packed_weight_bits(configs, tensor.shape[1:]) if stacked
                else packed_weight_bits(configs, tensor.shape))
        weights.append(WeightPlan(f"{name}.{slot}", tuple(tensor.shape), describe(attributes), _pattern(rule),
                                  None, before, math.ceil(bits / 8)))
    other = 0
    for module_name, module in model.named_modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if parameter.dim() < 2:
                other += _bytes(parameter)
                continue
            reason = ("embedding (quantize leaves embeddings to compress_weights)" if isinstance(module, nn.Embedding)
                      else f"no quantized class for {type(module).__name__}")
            size = _bytes(parameter)
            weights.append(WeightPlan(f"{module_name}.{param_name}", tuple(parameter.shape), FLOAT, None, reason,
                                      size, size))
    return Plan(weights, rule_matches, activations, other, config.algorithm)
