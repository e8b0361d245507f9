"""The cost of a choice: packed weight bits, scale storage included, and the effective bits they average to.

A module's bits under a format are ``lowbit.report.packed_weight_bits`` of each weight slot it quantizes
(elements times element bits, plus every scale in its stored width: E4M3 / E8M0 block scales 8 bits,
NVFP4's FP32 global scale, 16-bit per-channel / per-block scales, a lone FP32 per-tensor scale; fused
experts: each expert alone); a slot the format leaves off, and the :data:`~lowbit.search.candidates.NONE`
choice, count 16 bits per element. So NVFP4 (block 16) is 4.5 bits plus 32 per tensor, INT4 g128 4.125,
FP8 per tensor 8 plus 32 per tensor.

    effective bits = sum_m w_m * bits_m / sum_m w_m * numel_m

over every module holding quantizable weights (searched ones at their choice, disabled ones at 16 bits).
``cost_model="weight"``: ``w_m = 1``. ``cost_model="active_moe"``: routed experts weigh the share of
experts a token uses (``active_moe_expert_ratio`` in ``constraints["cost"]``, else the model config's
``num_experts_per_tok / num_local_experts`` (or ``num_experts``)), everything else 1: the bits a token reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from lowbit.config import QuantizeConfig
from lowbit.convert import _plan
from lowbit.modules import is_quantized
from lowbit.modules.registry import quantized_class_for
from lowbit.report import packed_weight_bits
from lowbit.search.candidates import EXPERT_NAME, NONE, SearchFormat
from lowbit.structure.weights import weights_by_slot

UNQUANTIZED_BITS = 16
COST_MODELS = ("weight", "active_moe")


@dataclass(frozen=True)
class ModuleCost:
    """One module's weight elements, its cost weight ``w`` and its packed bits per choice."""

    numel: int
    weight: float
    bits: dict[str, int]

    def cost(self, choice: str) -> float:
        return self.weight * self.bits[choice]


def module_costs(model: nn.Module, formats: list[SearchFormat], modules: list[str],
                 expert_ratio: float | None = None) -> dict[str, ModuleCost]:
    """{module name: ModuleCost} for ``modules`` under every format and NONE, from shapes and configs only
    (the model is not touched; a weight whose shape a format's blocks do not divide raises here)."""
    wanted = set(modules)
    numel = {name: _numel(model.get_submodule(name)) for name in modules}
    bits: dict[str, dict[str, int]] = {name: {NONE: UNQUANTIZED_BITS * numel[name]} for name in modules}
    for search_format in formats:
        for name, value in _format_bits(model, search_format.for_modules(wanted), wanted).items():
            bits[name][search_format.name] = value
    return {name: ModuleCost(numel[name], _weight(name, model.get_submodule(name), expert_ratio), bits[name])
            for name in modules}


def _format_bits(model: nn.Module, config: QuantizeConfig, wanted: set[str]) -> dict[str, int]:
    """Packed bits of each wanted module's weight slots under ``config`` (slots left off at 16 bits)."""
    totals: dict[str, int] = {}
    for name, module, slot, _, _, attributes in _plan(model, config):
        weight = weights_by_slot(module, _quantized_class(module)).get(slot) if name in wanted else None
        if weight is None:
            continue
        if attributes is None:
            value = UNQUANTIZED_BITS * weight.numel()
        else:
            configs = attributes if isinstance(attributes, list) else [attributes]
            value = (weight.shape[0] * packed_weight_bits(configs, weight.shape[1:]) if _is_stacked(module)
                     else packed_weight_bits(configs, weight.shape))
        totals[name] = totals.get(name, 0) + value
    return totals


def _quantized_class(module: nn.Module) -> type | None:
    return type(module) if is_quantized(module) else quantized_class_for(module)


def _is_stacked(module: nn.Module) -> bool:
    """Fused experts: weights (E, out, in), each expert quantized alone."""
    return getattr(_quantized_class(module), "stacked_weights", False)


def _numel(module: nn.Module) -> int:
    return sum(w.numel() for w in weights_by_slot(module, _quantized_class(module)).values())


def _weight(name: str, module: nn.Module, expert_ratio: float | None) -> float:
    is_expert = _is_stacked(module) or EXPERT_NAME.match(name) is not None
    return expert_ratio if (expert_ratio is not None and is_expert) else 1.0


def expert_ratio(model: nn.Module, constraints: dict) -> float | None:
    """The active share of routed experts for ``cost_model="active_moe"`` (module docstring), None for "weight"."""
    if constraints.get("cost_model", "weight") != "active_moe":
        return None
    ratio = constraints.get("cost", {}).get("active_moe_expert_ratio")
    if ratio is None:
        config = getattr(model, "config", None)
        active = getattr(config, "num_experts_per_tok", None)
        total = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
        if not active or not total:
            raise ValueError("constraints['cost_model']='active_moe' needs constraints['cost']"
                             "['active_moe_expert_ratio'] (active / total routed experts) or a model config with "
                             "num_experts_per_tok and num_local_experts (or num_experts)")
        ratio = active / total
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"constraints['cost']['active_moe_expert_ratio']={ratio!r}: expected a number in (0, 1]")
    return float(ratio)


def effective_bits(costs: dict[str, ModuleCost], choice: dict[str, str]) -> float:
    """Effective bits of the modules at ``choice`` ({module: format name}; missing modules at NONE)."""
    numerator = math.fsum(cost.cost(choice.get(name, NONE)) for name, cost in costs.items())
    return numerator / math.fsum(cost.weight * cost.numel for cost in costs.values())


def cheapest_bits(costs: dict[str, ModuleCost], fixed_numel: float) -> float:
    """Effective bits with every module in its cheapest choice and ``fixed_numel`` (cost-weighted) elements at
    16 bits: the least budget there is."""
    spent = math.fsum(min(cost.cost(choice) for choice in cost.bits) for cost in costs.values())
    numel = math.fsum(cost.weight * cost.numel for cost in costs.values()) + fixed_numel
    return (spent + UNQUANTIZED_BITS * fixed_numel) / numel
