"""save_compressed / load_compressed: a compressed model as safetensors plus a JSON description.

``save_compressed(model, path)`` writes the directory ``path`` with
- ``lowbit_compressed.json``: each CompressedLinear's shape, storage format, scale dtype, LoRA rank and
  quantizer states, each compressed fused-experts module's (``lowbit.compress.experts``), and
  ``lowbit.checkpoint.quant_state`` for modules still fake-quantized;
- ``model.safetensors``: the state dict (packed codes, scales, zero points, biases, amax ...).

``load_compressed(model_or_factory, path)`` rebuilds those modules on a fresh model of the same
architecture and assigns the saved tensors (``load_state_dict(assign=True)``): nothing dense is
materialised for the compressed layers, and outputs equal the saved model's.

``save_compressed`` writes through ``lowbit.files.atomic_directory`` (all or nothing). ``load_compressed``
rebuilds every module from the JSON on the meta device and checks each tensor's name, shape and dtype against
that description (and the model's) before it changes any module.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from lowbit.checkpoint import (
    build_model,
    check_tensors,
    fill_tied_keys,
    install_quantizers,
    load_quantizer,
    quant_state,
    quantizer_state,
    quantizers_from_state,
    read_state,
)
from lowbit.compress.experts import CompressedExpertsMixin, describe_experts, rebuild_experts
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.packed import WeightFormat
from lowbit.files import atomic_directory, origin, read_tensors
from lowbit.rotation.quarot import check_no_online_rotation

STATE_FILE = "lowbit_compressed.json"
TENSOR_FILE = "model.safetensors"
FORMAT_VERSION = 1
QUANTIZER_SLOTS = ("input_quantizer", "output_quantizer")
WRITER = "lowbit.save_compressed"


def _describe(module: CompressedLinear) -> dict:
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "bias_dtype": None if module.bias is None else str(module.bias.dtype).removeprefix("torch."),
        "weight_format": module.weight_format.to_dict(),
        "scale_dtype": str(module.weight_scale.dtype).removeprefix("torch."),
        "lora_rank": 0 if module.lora_a is None else module.lora_a.shape[0],
        "lora_scale": module.lora_scale,
        "quantizers": {slot: quantizer_state(getattr(module, slot)) for slot in QUANTIZER_SLOTS},
    }


def compressed_state(model: nn.Module) -> dict:
    """The JSON of ``save_compressed``: format version, then the description of each compressed Linear, each
    compressed fused-experts module and each module still fake-quantized, by module name."""
    compressed = {name: _describe(m) for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    experts = {name: describe_experts(m) for name, m in model.named_modules() if isinstance(m, CompressedExpertsMixin)}
    return {"format_version": FORMAT_VERSION, "compressed": compressed, "compressed_experts": experts,
            "quantized": quant_state(model)["modules"]}


def write_compressed(model: nn.Module, directory: Path) -> None:
    """``save_compressed``'s two files into the existing ``directory`` (not atomic: callers write into a staging
    directory)."""
    check_no_online_rotation(model, "lowbit.compress.save_compressed")
    state = compressed_state(model)
    if not state["compressed"] and not state["compressed_experts"]:
        raise ValueError("model has no CompressedLinear: call lowbit.compress.compress(model) first")
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))
    save_model(model, str(directory / TENSOR_FILE))


def save_compressed(model: nn.Module, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``path/lowbit_compressed.json`` and ``path/model.safetensors`` all at once; returns the directory.

    A non-empty ``path`` that lowbit did not write is refused unless ``overwrite=True`` (``lowbit.files``).
    """
    with atomic_directory(path, WRITER, overwrite) as staging:
        write_compressed(model, staging)
    return Path(path)


def _rebuild(entry: dict) -> CompressedLinear:
    fmt = WeightFormat.from_dict(entry["weight_format"])
    bias_dtype = entry.get("bias_dtype")  # absent in files written before 2026-12-07: float32, as then
    module = CompressedLinear(entry["in_features"], entry["out_features"], fmt, bias=entry["bias"], device="meta",
                              dtype=getattr(torch, bias_dtype) if bias_dtype else None,
                              scale_dtype=getattr(torch, entry["scale_dtype"]))
    for slot, saved in entry["quantizers"].items():
        setattr(module, slot, load_quantizer(saved))
    if entry["lora_rank"]:
        module.add_lora(entry["lora_rank"])
        module.lora_scale = entry["lora_scale"]
    return module


def _qualified(module_name: str, key: str) -> str:
    """``module_name.key``, or ``key`` for the root module (name "")."""
    return f"{module_name}.{key}" if module_name else key


def _rebuild_all(entries: dict, source: str) -> dict[str, CompressedLinear]:
    """Every described CompressedLinear, on the meta device; ValueError naming ``source`` and the entry."""
    if not isinstance(entries, dict):
        raise ValueError(f"{source}: 'compressed' should be a JSON object, found {type(entries).__name__}")
    rebuilt = {}
    for name, entry in entries.items():
        try:
            rebuilt[name] = _rebuild(entry)
        except KeyError as error:
            raise ValueError(f"{source}: compressed module {name!r} lacks the key {error}") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{source}: compressed module {name!r} has a bad description: {error}") from None
    return rebuilt


def _rebuilt_experts_on_meta(module: nn.Module, entry: dict, source: str) -> nn.Module:
    """A meta-device copy of the experts ``module`` rebuilt as ``entry`` describes (no real memory): what its
    state dict will be, known before the model's own module changes."""
    meta = {id(t): torch.empty_like(t, device="meta") for t in [*module.parameters(), *module.buffers()]}
    shadow = copy.deepcopy(module, meta)
    try:
        rebuild_experts(shadow, entry)
    except KeyError as error:
        raise ValueError(f"{source}: compressed experts lack the key {error}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{source}: compressed experts have a bad description: {error}") from None
    return shadow


def load_compressed(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | Path) -> nn.Module:
    """Rebuild the compressed (and fake-quantized) modules saved at ``path`` and load every tensor (strict).

    Both files are read, and each tensor checked against the JSON's description and the model, before any module
    changes.
    """
    directory = Path(path)
    state_file, tensor_file = directory / STATE_FILE, directory / TENSOR_FILE
    state = read_state(directory, STATE_FILE, FORMAT_VERSION, WRITER, keys=("compressed", "quantized"))
    source = f"{state_file} ({origin(directory, WRITER)})"
    rebuilt = _rebuild_all(state["compressed"], source)
    quantizers = quantizers_from_state(state["quantized"], source)
    model = build_model(model_or_factory)
    tensors = read_tensors(tensor_file, WRITER)
    modules = dict(model.named_modules())
    experts = state.get("compressed_experts", {})
    missing = [name for name in [*rebuilt, *experts] if name not in modules]
    if missing:
        raise ValueError(f"the model has no module(s) {missing[:5]} saved at {path}: a different architecture?")
    shadows = {name: _rebuilt_experts_on_meta(modules[name], entry, source) for name, entry in experts.items()}
    prefixes = tuple(_qualified(name, "") for name in [*rebuilt, *shadows])  # "" (one root module) covers all
    expected = {key: t for key, t in model.state_dict().items() if not key.startswith(prefixes)}
    for name, module in [*rebuilt.items(), *shadows.items()]:
        expected.update({_qualified(name, key): t for key, t in module.state_dict().items()})
    tensors = fill_tied_keys(tensors, model, expected)
    slots = [_qualified(name, slot) for name in rebuilt for slot in QUANTIZER_SLOTS]
    slots += [_qualified(name, slot) for name, entry in quantizers.items() for slot in entry]
    slots += [_qualified(name, slot) for name, entry in experts.items() for slot in entry["quantizers"]]
    check_tensors(tensor_file, tensors, expected, slots, exact_dtypes=True, writer=WRITER,
                  described_by=f"{state_file} (or the model)")
    install_quantizers(modules, quantizers)
    for name, entry in experts.items():
        rebuild_experts(modules[name], entry)
    for name, module in rebuilt.items():
        if name:
            model.set_submodule(name, module)
        else:
            model = module
    model.load_state_dict(tensors, strict=True, assign=True)
    return model
