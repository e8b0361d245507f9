"""save / restore a quantized model: tensors in safetensors, quantizer state in JSON, no pickle.

``save(model, path)`` writes the directory ``path`` with
- ``lowbit_quant_state.json``: for every quantized module its quantizers' attributes and switches;
- ``model.safetensors``: the model's state dict (weights and the quantizers' amax / pre_quant_scale).

``restore(model_or_factory, path)`` rebuilds the quantized modules on an unquantized model of the same
architecture (or a factory that makes one) and loads the tensors; the restored model's outputs are
identical to the saved one's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from lowbit.attributes import QuantizerAttributeConfig
from lowbit.modules import convert_module, is_quantized
from lowbit.quantizer import SequentialQuantizer, TensorQuantizer

STATE_FILE = "lowbit_quant_state.json"
TENSOR_FILE = "model.safetensors"
FORMAT_VERSION = 1


def _attributes_to_json(config: QuantizerAttributeConfig) -> dict:
    attributes = config.to_dict()
    if attributes["block_sizes"] is not None:
        attributes["block_sizes"] = {str(k): v for k, v in attributes["block_sizes"].items()}
    return attributes


def _attributes_from_json(attributes: dict) -> QuantizerAttributeConfig:
    attributes = dict(attributes)
    if attributes.get("block_sizes") is not None:
        attributes["block_sizes"] = {
            (int(k) if k.lstrip("-").isdigit() else k): v for k, v in attributes["block_sizes"].items()
        }
    return QuantizerAttributeConfig.from_dict(attributes)


def quantizer_state(quantizer: TensorQuantizer | SequentialQuantizer) -> dict | list[dict]:
    """JSON-ready attributes and switches of one quantizer (a list for a SequentialQuantizer)."""
    if isinstance(quantizer, SequentialQuantizer):
        return [quantizer_state(stage) for stage in quantizer]
    return {"attributes": _attributes_to_json(quantizer.config), "enabled": quantizer.is_enabled,
            "quant": quantizer._quant}


def load_quantizer(state: dict | list[dict]) -> TensorQuantizer | SequentialQuantizer:
    """The quantizer ``quantizer_state`` described (tensors such as amax are loaded separately)."""
    if isinstance(state, list):
        return SequentialQuantizer(*(load_quantizer(stage) for stage in state))
    quantizer = TensorQuantizer(_attributes_from_json(state["attributes"]))
    quantizer.enable() if state["enabled"] else quantizer.disable()
    quantizer.enable_quant() if state["quant"] else quantizer.disable_quant()
    return quantizer


def apply_quant_state(modules: dict[str, nn.Module], entries: dict[str, dict]) -> None:
    """Convert the named modules (``quant_state()["modules"]``) and give them their saved quantizers."""
    missing = [name for name in entries if name not in modules]
    if missing:
        raise ValueError(f"the model has no module(s) {missing[:5]} that were saved: a different architecture?")
    for name, entry in entries.items():
        module = modules[name]
        if not is_quantized(module):
            convert_module(module)
        for slot, saved in entry["quantizers"].items():
            setattr(module, slot, load_quantizer(saved))


def quant_state(model: nn.Module) -> dict:
    """JSON-ready description of every quantized module and its quantizers."""
    modules = {}
    for name, module in model.named_modules():
        if not is_quantized(module):
            continue
        slots = {slot: quantizer_state(getattr(module, slot)) for slot in module.quantizer_names}
        modules[name] = {"class": type(module).__name__, "quantizers": slots}
    return {"format_version": FORMAT_VERSION, "modules": modules}


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/lowbit_quant_state.json`` and ``path/model.safetensors``; returns the directory."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = quant_state(model)
    if not state["modules"]:
        raise ValueError("model has no quantized module: call lowbit.quantize(model, config) first")
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))
    save_model(model, str(directory / TENSOR_FILE))
    return directory


def read_state(path: str | Path, state_name: str, format_version: int, writer: str) -> dict:
    """The JSON state ``path/state_name`` written by ``writer``, checked for its format version."""
    state_file = Path(path) / state_name
    if not state_file.is_file():
        raise FileNotFoundError(f"path={str(path)!r} holds no {state_name}; was it written by {writer}?")
    state = json.loads(state_file.read_text())
    if state.get("format_version") != format_version:
        raise ValueError(f"{state_file}: format_version {state.get('format_version')} is not {format_version}")
    return state


def build_model(model_or_factory: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """The model itself, or what the factory makes."""
    return model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()


def restore(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | Path) -> nn.Module:
    """Rebuild the quantizers saved at ``path`` on a fresh model and load all tensors (strict)."""
    directory = Path(path)
    state = read_state(directory, STATE_FILE, FORMAT_VERSION, "lowbit.save")
    model = build_model(model_or_factory)
    modules = dict(model.named_modules())
    apply_quant_state(modules, state["modules"])
    missing_keys, unexpected = load_model(model, str(directory / TENSOR_FILE), strict=False)
    for name in state["modules"]:
        module = modules[name]
        device = next((p.device for p in module.parameters(recurse=False)), None)
        if device is not None:
            for slot in module.quantizer_names:
                getattr(module, slot).to(device)
    if unexpected or missing_keys:
        raise ValueError(
            f"restoring {path}: tensors not in the model {sorted(unexpected)[:5]}, "
            f"model tensors not saved {sorted(missing_keys)[:5]}"
        )
    return model
