"""save / restore a quantized model: tensors in safetensors, quantizer state in JSON, no pickle.

``save(model, path)`` writes the directory ``path`` with
- ``lowbit_quant_state.json``: for every quantized module its quantizers' attributes and switches;
- ``model.safetensors``: the model's state dict (weights and the quantizers' amax / pre_quant_scale).

``restore(model_or_factory, path)`` rebuilds the quantized modules on an unquantized model of the same
architecture (or a factory that makes one) and loads the tensors; the restored model's outputs are
identical to the saved one's.

``save`` writes through ``lowbit.files.atomic_directory`` (all or nothing). ``restore`` reads both files and
checks them against each other and the model (names, shapes, kinds of dtype) before it changes any module;
a missing, corrupt or mismatched file raises an error that names the file and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from safetensors.torch import save_model
from torch import Tensor, nn

from lowbit.attributes import QuantizerAttributeConfig
from lowbit.files import atomic_directory, origin, read_json, read_tensors
from lowbit.modules import convert_module, is_quantized
from lowbit.quantizer import STATE_BUFFERS, SequentialQuantizer, TensorQuantizer
from lowbit.rotation.quarot import check_no_online_rotation

Quantizers = dict[str, dict[str, TensorQuantizer | SequentialQuantizer]]

STATE_FILE = "lowbit_quant_state.json"
TENSOR_FILE = "model.safetensors"
FORMAT_VERSION = 1
WRITER = "lowbit.save"


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


def quantizers_from_state(entries: dict, source: str) -> Quantizers:
    """``{module name: {slot: quantizer}}`` from ``quant_state()["modules"]``, without touching any model.

    ValueError naming ``source`` (the JSON file) and the entry when an entry lacks a key or holds bad attributes.
    """
    if not isinstance(entries, dict):
        raise ValueError(f"{source}: expected a JSON object of modules, found {type(entries).__name__}")
    quantizers: Quantizers = {}
    for name, entry in entries.items():
        try:
            quantizers[name] = {slot: load_quantizer(saved) for slot, saved in entry["quantizers"].items()}
        except KeyError as error:
            raise ValueError(f"{source}: module {name!r} lacks the key {error}") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{source}: module {name!r} has a bad quantizer state: {error}") from None
    return quantizers


def install_quantizers(modules: dict[str, nn.Module], quantizers: Quantizers) -> None:
    """Convert the named modules and give them ``quantizers`` (from :func:`quantizers_from_state`)."""
    missing = [name for name in quantizers if name not in modules]
    if missing:
        raise ValueError(f"the model has no module(s) {missing[:5]} that were saved: a different architecture?")
    for name, slots in quantizers.items():
        module = modules[name]
        if not is_quantized(module):
            convert_module(module)
        for slot, quantizer in slots.items():
            setattr(module, slot, quantizer)


def quant_state(model: nn.Module) -> dict:
    """JSON-ready description of every quantized module and its quantizers."""
    modules = {}
    for name, module in model.named_modules():
        if not is_quantized(module):
            continue
        slots = {slot: quantizer_state(getattr(module, slot)) for slot in module.quantizer_names}
        modules[name] = {"class": type(module).__name__, "quantizers": slots}
    return {"format_version": FORMAT_VERSION, "modules": modules}


def write_checkpoint(model: nn.Module, directory: Path) -> None:
    """``save``'s two files into the existing ``directory`` (not atomic: callers write into a staging directory)."""
    check_no_online_rotation(model, "lowbit.save")
    state = quant_state(model)
    if not state["modules"]:
        raise ValueError("model has no quantized module: call lowbit.quantize(model, config) first")
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))
    save_model(model, str(directory / TENSOR_FILE))


def save(model: nn.Module, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``path/lowbit_quant_state.json`` and ``path/model.safetensors`` all at once; returns the directory.

    A non-empty ``path`` that lowbit did not write is refused unless ``overwrite=True`` (``lowbit.files``).
    """
    with atomic_directory(path, WRITER, overwrite) as staging:
        write_checkpoint(model, staging)
    return Path(path)


def read_state(path: str | Path, state_name: str, format_version: int, writer: str,
               keys: Iterable[str] = ()) -> dict:
    """The JSON state ``path/state_name`` written by ``writer``, checked for its format version and ``keys``.

    Errors name the file, the problem (missing, not JSON, unknown format_version, missing key) and the writer.
    """
    directory = Path(path)
    state_file = directory / state_name
    state = read_json(state_file, writer)
    if state.get("format_version") != format_version:
        raise ValueError(f"{state_file}: format_version {state.get('format_version')!r} is not {format_version}, "
                         f"the only one this lowbit reads ({origin(directory, writer)})")
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"{state_file}: missing key(s) {missing}, truncated or not a lowbit state? "
                         f"({origin(directory, writer)})")
    return state


def check_tensors(tensor_file: Path, tensors: dict[str, Tensor], expected: dict[str, Tensor],
                  quantizer_slots: Iterable[str], exact_dtypes: bool, writer: str,
                  described_by: str = "the model") -> None:
    """ValueError naming ``tensor_file`` and its ``writer`` unless its ``tensors`` fit ``expected`` (a state dict,
    meta tensors welcome, from what ``described_by`` names).

    Every expected name is in the file (a tied copy of a tensor that is there aside); shapes are equal; dtypes are
    equal (``exact_dtypes``) or of the same kind, floating or not (loading casts between float dtypes). A name not
    expected must be a quantizer buffer (``amax``, ``amin``, ``pre_quant_scale``) under one of
    ``quantizer_slots`` (``"module.slot"``), whose shapes only calibration decides.
    """
    present = {t.data_ptr() for name, t in expected.items() if name in tensors and t.device.type != "meta"}
    missing = [name for name, t in expected.items()
               if name not in tensors and (t.device.type == "meta" or t.data_ptr() not in present)]
    slots = tuple(f"{slot}." for slot in quantizer_slots)
    unexpected = [name for name in tensors if name not in expected
                  and not (name.startswith(slots) and name.rsplit(".", 1)[-1] in STATE_BUFFERS)]
    if missing or unexpected:
        raise ValueError(f"{tensor_file}: tensors the model expects are missing {sorted(missing)[:5]}, tensors it "
                         f"does not have {sorted(unexpected)[:5]}: a different architecture or a damaged file? "
                         f"({origin(tensor_file.parent, writer)})")
    for name, want in expected.items():
        have = tensors.get(name)
        if have is None:
            continue
        same_dtype = have.dtype == want.dtype if exact_dtypes else have.is_floating_point() == want.is_floating_point()
        if have.shape != want.shape or not same_dtype:
            raise ValueError(f"{tensor_file}: tensor {name!r} is {have.dtype} {tuple(have.shape)}, but "
                             f"{described_by} expects {want.dtype} {tuple(want.shape)} "
                             f"({origin(tensor_file.parent, writer)})")


def build_model(model_or_factory: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """The model itself, or what the factory makes."""
    return model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()


def fill_tied_keys(tensors: dict[str, Tensor], model: nn.Module, expected: Collection[str]) -> dict[str, Tensor]:
    """``tensors`` plus the ``expected`` names of tied parameters they lack: safetensors' ``save_model`` writes a
    parameter shared by several modules (GPT-2's ``transformer.wte.weight`` and ``lm_head.weight``) once."""
    names_by_parameter: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, parameter in module.named_parameters(recurse=False):
            names_by_parameter.setdefault(id(parameter), []).append(f"{module_name}.{name}" if module_name else name)
    filled = dict(tensors)
    for names in names_by_parameter.values():
        saved = next((name for name in names if name in tensors), None)
        if saved is not None:
            filled.update({name: tensors[saved] for name in names if name not in tensors and name in expected})
    return filled


def restore(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | Path) -> nn.Module:
    """Rebuild the quantizers saved at ``path`` on a fresh model and load all tensors (strict).

    Both files are read and checked against each other and the model before any module changes.
    """
    directory = Path(path)
    state = read_state(directory, STATE_FILE, FORMAT_VERSION, WRITER, keys=("modules",))
    quantizers = quantizers_from_state(state["modules"], f"{directory / STATE_FILE} ({origin(directory, WRITER)})")
    model = build_model(model_or_factory)
    expected = model.state_dict()
    tensors = fill_tied_keys(read_tensors(directory / TENSOR_FILE, WRITER), model, expected)
    modules = dict(model.named_modules())
    slots = [f"{name}.{slot}" for name, entry in quantizers.items() for slot in entry]
    check_tensors(directory / TENSOR_FILE, tensors, expected, slots, exact_dtypes=False, writer=WRITER)
    install_quantizers(modules, quantizers)
    model.load_state_dict(tensors, strict=False)
    for name in quantizers:
        module = modules[name]
        device = next((p.device for p in module.parameters(recurse=False)), None)
        if device is not None:
            for slot in module.quantizer_names:
                getattr(module, slot).to(device)
    return model
