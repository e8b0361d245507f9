"""Fused MoE experts written as the per-expert tensors of the original checkpoints, which vLLM and
transformers load.

transformers >= 5.20 holds a MoE layer's experts as 3-D Parameters (``lowbit.modules.experts``):
``gate_up_proj (E, 2I, H)`` (gate rows first, then up) and ``down_proj (E, H, I)``. The checkpoints on the Hub,
and vLLM's loaders, name one ``(out, in)`` matrix per expert and projection instead:

| model_type                  | per-expert names (expert e)                     | module renamed                   |
|-----------------------------|-------------------------------------------------|----------------------------------|
| mixtral                     | ``experts.{e}.w1`` (gate), ``w3`` (up), ``w2``  | ``.mlp.`` -> ``.block_sparse_moe.`` |
| qwen2_moe, qwen3_moe, olmoe | ``experts.{e}.gate_proj``, ``up_proj``, ``down_proj`` | -                          |

(transformers' own conversion table, ``conversion_mapping.py``, maps these names onto the fused Parameters
when it loads them.) Each expert's projection becomes one exported layer: its weight is the expert's slice,
its weight quantizer that expert's share of the stacked quantizer (``ExpertQuantizer.expert``) with the gate
and up halves of a per-channel / per-block ``amax`` split by rows (a per-tensor ``amax`` applies to both),
its input quantizer that expert's input quantizer (gate and up share it). Experts whose weight quantizer is
disabled, and experts never quantized, are written in float under the same names; the routers (``<block>.gate``)
are listed as unquantized layers, since vLLM builds them as linears. Other model types with
fused experts, experts with biases and two-stage (W4A8) expert weights are refused, naming the module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.modules.experts import QuantExpertsMixin, expert_projections, is_fused_experts
from lowbit.quantizer import SequentialQuantizer, TensorQuantizer


@dataclass(frozen=True)
class ExpertNames:
    """Per-expert projection names of one model family, and the renames of its module path."""

    gate: str
    up: str
    down: str
    renames: tuple[tuple[str, str], ...] = ()


QWEN = ExpertNames("gate_proj", "up_proj", "down_proj")
LAYOUTS = {"mixtral": ExpertNames("w1", "w3", "w2", renames=((".mlp.", ".block_sparse_moe."),)),
           "qwen2_moe": QWEN, "qwen3_moe": QWEN, "olmoe": QWEN}


@dataclass(frozen=True)
class ExpertProjection:
    """One expert's projection as an exported layer: checkpoint name, (out, in) weight, its enabled weight
    quantizer (None: kept in float) and its input quantizer (enabled or not: a pre_quant_scale still applies)."""

    name: str
    weight: torch.Tensor
    weight_quantizer: TensorQuantizer | None
    input_quantizer: TensorQuantizer | None


def fused_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every fused-experts module (quantized or not)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantExpertsMixin) or is_fused_experts(module):
            yield name, module


def _layout(model: nn.Module, name: str, module: nn.Module) -> ExpertNames:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise ValueError(f"{name}: fused experts of model_type={model_type!r} have no per-expert checkpoint layout "
                         f"here; exported are {sorted(LAYOUTS)}")
    if module.has_bias or not module.has_gate:
        raise ValueError(f"{name}: experts with {'biases' if module.has_bias else 'no gate'} are not exported "
                         f"(the {model_type} layout has gated experts without biases)")
    return LAYOUTS[model_type]


def checkpoint_renamer(model: nn.Module) -> Callable[[str], str]:
    """The key rename from the model's module paths to its checkpoint's (identity for most families)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    renames = LAYOUTS[model_type].renames if model_type in LAYOUTS and any(fused_experts(model)) else ()

    def rename(key: str) -> str:
        for old, new in renames:
            key = key.replace(old, new)
        return key

    return rename


def fused_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the fused 3-D expert Parameters, which the per-expert tensors replace."""
    return {f"{name}.{projection}" for name, module in fused_experts(model) for projection in
            expert_projections(module)}


def router_names(model: nn.Module) -> list[str]:
    """Checkpoint names of the MoE routers (``<block>.gate``, not an ``nn.Linear`` in transformers 5, so never
    quantized): vLLM builds them as linear layers, so the exports list them as unquantized."""
    rename = checkpoint_renamer(model)
    names = []
    for name, _ in fused_experts(model):
        block = name.rpartition(".")[0]
        router = getattr(model.get_submodule(block), "gate", None) if block else None
        if isinstance(getattr(router, "weight", None), torch.Tensor) and not isinstance(router, nn.Linear):
            names.append(rename(f"{block}.gate"))
    return names


def _standalone(view: TensorQuantizer, half: int | None, name: str) -> TensorQuantizer:
    """A standalone quantizer with the config and state of one expert's share ``view`` of a stacked quantizer:
    all its rows (``half=None``), or the gate (0) / up (1) rows of a per-channel / per-block state."""
    out = TensorQuantizer(view.config)

    def pick(values: torch.Tensor) -> torch.Tensor:
        return values.detach() if half is None else _rows(values.detach(), half, name)

    if view.amax is not None:
        out.set_amax(pick(view.amax), None if view.amin is None else pick(view.amin))
    stacked_blocks = getattr(view.parent, "block_amax", None)  # NVFP4 / MX scale-search maxima, stacked
    if stacked_blocks is not None:
        if stacked_blocks.shape[0] != view.parent.num_experts:
            raise ValueError(f"{name}: block_amax {tuple(stacked_blocks.shape)} is not stacked per expert")
        out.block_amax = pick(stacked_blocks[view.index])
    return out


def _rows(values: torch.Tensor, half: int, name: str) -> torch.Tensor:
    if values.numel() == 1:
        return values
    if values.shape[0] % 2:
        raise ValueError(f"{name}: the gate_up weight quantizer's state {tuple(values.shape)} does not split into "
                         "gate and up rows")
    rows = values.shape[0] // 2
    return values[half * rows:(half + 1) * rows]


def _enabled(quantizer) -> TensorQuantizer | None:
    if isinstance(quantizer, SequentialQuantizer):
        raise ValueError("a two-stage (sequential) expert quantizer has no per-expert export layout")
    return quantizer if isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled else None


def expert_projections_of(model: nn.Module) -> list[ExpertProjection]:
    """Every expert's gate, up and down projection of every fused-experts module, checkpoint-named (module
    docstring); the quantizers are None where that projection is not quantized."""
    rename = checkpoint_renamer(model)
    found = []
    for name, module in fused_experts(model):
        names = _layout(model, name, module)
        gate_up, down = expert_projections(module)
        quantized = isinstance(module, QuantExpertsMixin)
        weights = {p: QuantExpertsMixin.expert_weight(module, p) for p in (gate_up, down)}  # (E, out, in)
        for expert in range(module.num_experts):
            prefix = rename(f"{name}.{expert}")
            views = {}
            for projection in (gate_up, down):
                if not quantized:
                    views[projection] = (None, None)
                    continue
                try:
                    weight_q = _enabled(getattr(module, f"{projection}_weight_quantizer").expert(expert))
                except ValueError as error:
                    raise ValueError(f"{name}.{projection}: {error}") from None
                views[projection] = (weight_q, getattr(module, f"{projection}_input_quantizer").expert(expert))
            stacked = weights[gate_up][expert]
            rows = stacked.shape[0] // 2
            weight_q, input_q = views[gate_up]
            for half, short in enumerate((names.gate, names.up)):
                half_q = None if weight_q is None else _standalone(weight_q, half, f"{name}.{gate_up}")
                found.append(ExpertProjection(f"{prefix}.{short}", stacked[half * rows:(half + 1) * rows], half_q,
                                              input_q))
            weight_q, input_q = views[down]
            down_q = None if weight_q is None else _standalone(weight_q, None, f"{name}.{down}")
            found.append(ExpertProjection(f"{prefix}.{names.down}", weights[down][expert], down_q, input_q))
    return found
