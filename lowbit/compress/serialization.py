"""save_compressed / load_compressed: a compressed model as safetensors plus a JSON description.

``save_compressed(model, path)`` writes the directory ``path`` with
- ``lowbit_compressed.json``: each CompressedLinear's shape, storage format, scale dtype, LoRA rank and
  quantizer states, each compressed fused-experts module's (``lowbit.compress.experts``), and
  ``lowbit.checkpoint.quant_state`` for modules still fake-quantized;
- ``model.safetensors``: the state dict (packed codes, scales, zero points, biases, amax ...).

``load_compressed(model_or_factory, path)`` rebuilds those modules on a fresh model of the same
architecture and assigns the saved tensors (``load_state_dict(assign=True)``): nothing dense is
materialised for the compressed layers, and outputs equal the saved model's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from lowbit.checkpoint import (
    apply_quant_state,
    build_model,
    load_quantizer,
    quant_state,
    quantizer_state,
    read_state,
)
from lowbit.compress.experts import CompressedExpertsMixin, describe_experts, rebuild_experts
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.packed import WeightFormat

STATE_FILE = "lowbit_compressed.json"
TENSOR_FILE = "model.safetensors"
FORMAT_VERSION = 1
QUANTIZER_SLOTS = ("input_quantizer", "output_quantizer")


def _describe(module: CompressedLinear) -> dict:
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "weight_format": module.weight_format.to_dict(),
        "scale_dtype": str(module.weight_scale.dtype).removeprefix("torch."),
        "lora_rank": 0 if module.lora_a is None else module.lora_a.shape[0],
        "lora_scale": module.lora_scale,
        "quantizers": {slot: quantizer_state(getattr(module, slot)) for slot in QUANTIZER_SLOTS},
    }


def save_compressed(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/lowbit_compressed.json`` and ``path/model.safetensors``; returns the directory."""
    compressed = {name: _describe(m) for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    experts = {name: describe_experts(m) for name, m in model.named_modules() if isinstance(m, CompressedExpertsMixin)}
    if not compressed and not experts:
        raise ValueError("model has no CompressedLinear: call lowbit.compress.compress(model) first")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, "compressed": compressed, "compressed_experts": experts,
             "quantized": quant_state(model)["modules"]}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))
    save_model(model, str(directory / TENSOR_FILE))
    return directory


def _rebuild(entry: dict) -> CompressedLinear:
    fmt = WeightFormat.from_dict(entry["weight_format"])
    module = CompressedLinear(entry["in_features"], entry["out_features"], fmt, bias=entry["bias"], device="meta",
                              scale_dtype=getattr(torch, entry["scale_dtype"]))
    for slot, saved in entry["quantizers"].items():
        setattr(module, slot, load_quantizer(saved))
    if entry["lora_rank"]:
        module.add_lora(entry["lora_rank"])
        module.lora_scale = entry["lora_scale"]
    return module


def load_compressed(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | Path) -> nn.Module:
    """Rebuild the compressed (and fake-quantized) modules saved at ``path`` and load every tensor (strict)."""
    directory = Path(path)
    state = read_state(directory, STATE_FILE, FORMAT_VERSION, "save_compressed")
    model = build_model(model_or_factory)
    modules = dict(model.named_modules())
    experts = state.get("compressed_experts", {})
    missing = [name for name in [*state["compressed"], *experts] if name not in modules]
    if missing:
        raise ValueError(f"the model has no module(s) {missing[:5]} saved at {path}: a different architecture?")
    apply_quant_state(modules, state["quantized"])
    for name, entry in experts.items():
        rebuild_experts(modules[name], entry)
    for name, entry in state["compressed"].items():
        if name:
            model.set_submodule(name, _rebuild(entry))
        else:
            model = _rebuild(entry)
    model.load_state_dict(load_file(str(directory / TENSOR_FILE)), strict=True, assign=True)
    return model
