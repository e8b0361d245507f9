"""load_quantized for fused MoE experts: the per-expert tensors ``lowbit.export.experts`` writes, stacked back
into the model's fused experts module.

A fresh transformers model holds each MoE layer's experts as 3-D Parameters (``gate_up_proj (E, 2I, H)``,
``down_proj (E, H, I)``); the export holds one ``(out, in)`` layer per expert and projection, under the
checkpoint names of ``lowbit.export.experts.LAYOUTS`` (Mixtral: ``block_sparse_moe.experts.{e}.w1/w3/w2``).
For each experts module, expert ``e``:

- quantized (every projection of every expert has a ``weight_scale``): the exported layers are read as a
  dense layer's are (``read_layer``: codes and ``scale = 1 / weight_scale``), gate and up joined by rows into
  one ``(2I, H)`` PackedWeight (their rows concatenated; a per-tensor scale, shared by gate and up when
  exported, must be the same in both), the E experts stacked into ``lowbit.compress.experts`` storage; the
  input quantizers become per-expert ExpertQuantizers (expert ``e``'s amax / pre_quant_scale from its gate
  and its down layer);
- float (no projection quantized): the per-expert weights stacked into the 3-D Parameters;
- anything else (some projections quantized, a layout without packed storage) is a ValueError naming the
  module.

Keys of other tensors are mapped back from checkpoint names (``checkpoint_renamer``) to module paths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowbit.compress.experts import PackedExperts, install_packed_experts
from lowbit.compress.packed import PackedWeight
from lowbit.expert_quantizer import ExpertQuantizer, per_expert
from lowbit.export.experts import LAYOUTS, checkpoint_renamer, fused_experts
from lowbit.modules.experts import QuantExpertsMixin, expert_projections
from lowbit.quantizer import TensorQuantizer

# read_layer(checkpoint name, (out, in)) -> (PackedWeight or None, dense weight or None, input quantizer);
# it removes the layer's tensors from the export's tensor dict
LayerReader = Callable[[str, tuple[int, int]], tuple[PackedWeight | None, torch.Tensor | None, TensorQuantizer]]


def expert_layer_names(model: nn.Module) -> dict[str, list[tuple[str, str, str]]]:
    """{experts module name: [(gate, up, down) checkpoint layer names of expert e] for e in 0..E-1}."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = list(fused_experts(model))
    if found and model_type not in LAYOUTS:
        raise ValueError(f"{found[0][0]}: fused experts of model_type={model_type!r}; load_quantized reads the "
                         f"per-expert layouts of {sorted(LAYOUTS)}")
    rename = checkpoint_renamer(model)
    names = {}
    for name, module in found:
        layout = LAYOUTS[model_type]
        names[name] = [tuple(f"{rename(f'{name}.{e}')}.{short}" for short in (layout.gate, layout.up, layout.down))
                       for e in range(module.num_experts)]
    return names


def load_experts(model: nn.Module, tensors: dict[str, torch.Tensor], quantized: set[str],
                 read_layer: LayerReader) -> list[str]:
    """Rebuild every fused-experts module of the fresh ``model`` from ``tensors`` (module docstring), removing
    the tensors it uses; ``quantized`` holds the checkpoint names of the exported quantized layers. Returns the
    names of the experts modules it filled."""
    filled = []
    for name, experts in expert_layer_names(model).items():
        module = model.get_submodule(name)
        layers = [layer for expert in experts for layer in expert]
        done = [layer in quantized for layer in layers]
        if all(done):
            _install_quantized(name, module, experts, read_layer)
        elif not any(done):
            _load_float(name, module, experts, tensors)
        else:
            raise ValueError(f"{name}: {sum(done)} of its {len(layers)} per-expert layers are quantized; "
                             "load_quantized rebuilds experts that are all quantized or all float")
        filled.append(name)
    return filled


def _load_float(name: str, module: nn.Module, experts: list[tuple[str, str, str]],
                tensors: dict[str, torch.Tensor]) -> None:
    gate_up, down = expert_projections(module)
    weights = {gate_up: [], down: []}
    for gate, up, down_name in experts:
        weights[gate_up].append(torch.cat([tensors.pop(f"{gate}.weight"), tensors.pop(f"{up}.weight")]))
        weights[down].append(tensors.pop(f"{down_name}.weight"))
    for projection, stacked in weights.items():
        value = torch.stack(stacked)  # (E, out, in)
        target = getattr(module, projection)
        if module.is_transposed:
            value = value.transpose(-1, -2)
        if value.shape != target.shape:
            raise ValueError(f"{name}.{projection}: the export's experts stack to {tuple(value.shape)}, the model "
                             f"has {tuple(target.shape)}")
        target.data = value.to(target.dtype).contiguous()


def _install_quantized(name: str, module: nn.Module, experts: list[tuple[str, str, str]],
                       read_layer: LayerReader) -> None:
    gate_up, down = expert_projections(module)
    shapes = {p: tuple(QuantExpertsMixin.expert_weight(module, p).shape[1:]) for p in (gate_up, down)}
    half = (shapes[gate_up][0] // 2, shapes[gate_up][1])
    packed = {gate_up: [], down: []}
    inputs = {gate_up: [], down: []}
    for gate, up, down_name in experts:
        gate_weight, gate_input = _packed(name, gate, half, read_layer)
        up_weight, _ = _packed(name, up, half, read_layer)  # gate and up share their input quantizer
        packed[gate_up].append(_join_rows(gate_weight, up_weight, f"{name} ({gate}, {up})"))
        inputs[gate_up].append(gate_input)
        down_weight, down_input = _packed(name, down_name, shapes[down], read_layer)
        packed[down].append(down_weight)
        inputs[down].append(down_input)
    stacked = {p: _stack(weights, shapes[p]) for p, weights in packed.items()}
    quantizers = {p: _per_expert_input(q, f"{name}.{p}") for p, q in inputs.items()}
    install_packed_experts(module, type(module), stacked, quantizers, torch.float32)  # read_layer's scales


def _packed(module_name: str, layer: str, shape: tuple[int, int], read_layer: LayerReader):
    weight, dense, input_quantizer = read_layer(layer, shape)
    if weight is None:
        raise ValueError(f"{module_name}: expert layer {layer!r} has no packed storage (kept dense for a Linear); "
                         "load_quantized cannot rebuild these experts")
    return weight, input_quantizer


def _join_rows(gate: PackedWeight, up: PackedWeight, name: str) -> PackedWeight:
    """One (2I, H) PackedWeight from gate (I, H) and up (I, H): row-wise tensors concatenated, per-tensor ones
    (scale (1, 1), NVFP4's global scale) required equal."""
    if gate.format != up.format:
        raise ValueError(f"{name}: gate and up are exported in different formats ({gate.format}, {up.format})")
    rows = gate.shape[0]
    joined = {}
    for key, value in gate.tensors().items():
        other = up.tensors()[key]
        if value.dim() and value.shape[0] == rows:
            joined[key] = torch.cat([value, other])
        elif torch.equal(value, other):
            joined[key] = value
        else:
            raise ValueError(f"{name}: gate and up have different per-tensor {key} ({value.flatten()[:1].item()}, "
                             f"{other.flatten()[:1].item()}); the fused gate_up projection holds one")
    return PackedWeight(gate.format, (2 * rows, gate.shape[1]), **joined)


def _stack(weights: list[PackedWeight], shape: tuple[int, int]) -> PackedExperts:
    first = weights[0]
    tensors = {key: torch.stack([w.tensors()[key] for w in weights]) for key in first.tensors()}
    return PackedExperts(first.format, (len(weights), *shape), tensors)


def _per_expert_input(quantizers: list[TensorQuantizer], name: str) -> ExpertQuantizer:
    """One ExpertQuantizer whose expert ``e`` has ``quantizers[e]``'s config, switches, amax and pre_quant_scale."""
    first = quantizers[0]
    stacked = per_expert(first, len(quantizers))
    for index, quantizer in enumerate(quantizers):
        if quantizer.config != first.config or quantizer.is_enabled != first.is_enabled:
            raise ValueError(f"{name}: expert {index}'s input quantizer differs from expert 0's "
                             f"({quantizer.config.format_name} vs {first.config.format_name})")
        view = stacked.expert(index)
        if quantizer.amax is not None:
            view.set_amax(quantizer.amax)
        if quantizer.pre_quant_scale is not None:
            view.pre_quant_scale = quantizer.pre_quant_scale
    return stacked


def module_key(model: nn.Module) -> Callable[[str], str]:
    """The map from the export's tensor names (Mixtral's ``block_sparse_moe``) back to the state-dict keys of the
    fresh ``model`` (call it before its experts are rebuilt); other names map to themselves."""
    rename = checkpoint_renamer(model)
    back = {rename(key): key for key in model.state_dict()}
    return lambda key: back.get(key, key)
