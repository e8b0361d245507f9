"""A model built on the meta device and given its weights one part at a time, from the safetensors shards of a
Hugging Face directory.

- :func:`meta_model`: the architecture of ``directory/config.json``, every parameter and buffer on the meta
  device (no memory);
- :class:`SafetensorsShards`: where each tensor lies (the shards of ``model.safetensors.index.json``, or the
  single ``model.safetensors``, from their headers); :meth:`SafetensorsShards.read` reads a part's tensors
  straight into their own memory, so the host holds the part's bytes and nothing of the rest;
- :func:`materialise`: a part's parameters (and persistent buffers) from the shards, on a device, in the
  parameter's dtype; non-persistent buffers (rotary ``inv_freq``) from the model's own ``_init_weights``;
- :func:`release`: a part's parameters back on the meta device (its quantizers' calibrated state stays).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from lowbit.quantizer import TensorQuantizer
from lowbit.scale.output import SAFETENSORS_DTYPES, read_header

TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def meta_model(directory: str | Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``directory/config.json`` in ``dtype``, on the meta device, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class SafetensorsShards:
    """The tensors of a Hugging Face safetensors checkpoint (one file or shards with an index), read by name."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index.is_file():
            try:
                files = sorted({self.directory / file for file in json.loads(index.read_text())["weight_map"].values()})
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({error})") from None
        elif single.is_file():
            files = [single]
        else:
            raise FileNotFoundError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE}: quantize_layerwise "
                                    "reads safetensors checkpoints")
        self.entries: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data start, header entry)
        for file in files:
            try:
                header, data_start = read_header(file)
            except (OSError, ValueError, struct.error) as error:
                raise ValueError(f"{file}: not a readable safetensors file ({error})") from None
            header.pop("__metadata__", None)
            self.entries.update({name: (file, data_start, entry) for name, entry in header.items()})

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (CPU, stored dtype), each read straight into its own memory: no mapping of the file,
        whose pages would count as resident on top of the copy while it is made."""
        missing = [name for name in names if name not in self.entries]
        if missing:
            raise KeyError(f"{self.directory}: the checkpoint has no tensor(s) {missing[:5]}")
        tensors = {}
        for name in names:
            file, data_start, entry = self.entries[name]
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=TORCH_DTYPES[entry["dtype"]])
            with open(file, "rb") as handle:
                handle.seek(data_start + begin)
                if tensor.numel() and handle.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                    raise ValueError(f"{file}: truncated inside tensor {name!r}")
            tensors[name] = tensor
        return tensors


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def materialise(model: nn.Module, part: nn.Module, prefix: str, shards: SafetensorsShards, device: torch.device,
                skip: nn.Module | None = None) -> None:
    """Give ``part`` (the module named ``prefix`` in ``model``), less the modules inside ``skip``, its parameters
    and persistent buffers from ``shards`` on ``device``, in place; tied parameters stay tied (a tensor stored
    under one name, the head tied to the embedding, is read once).

    Non-persistent buffers still on the meta device come from ``model._init_weights`` (transformers computes
    rotary frequencies there). KeyError naming the tensor if the checkpoint lacks one.
    """
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    modules = [(name, m) for name, m in part.named_modules(remove_duplicate=False) if id(m) not in skipped]
    parameters = [(_qualified(owner, name), p) for owner, m in modules
                  for name, p in m.named_parameters(recurse=False) if p.is_meta]
    stored = {}  # id of each meta tensor -> a name of it the checkpoint holds
    for name, parameter in parameters:
        if id(parameter) not in stored or _qualified(prefix, name) in shards:
            stored.setdefault(id(parameter), name)
            if _qualified(prefix, name) in shards:
                stored[id(parameter)] = name
    loaded = shards.read([_qualified(prefix, name) for name in stored.values()])
    replacement = {}
    for key, name in stored.items():
        meta = dict(parameters)[name]
        value = loaded.pop(_qualified(prefix, name)).to(device=device, dtype=meta.dtype)
        replacement[key] = nn.Parameter(value, requires_grad=False)
    for name, parameter in parameters:
        owner, _, leaf = name.rpartition(".")
        setattr(part.get_submodule(owner), leaf, replacement[id(parameter)])
    for owner_name, owner in modules:
        _materialise_buffers(model, owner, _qualified(prefix, owner_name), shards, device)


def _materialise_buffers(model: nn.Module, owner: nn.Module, owner_name: str, shards: SafetensorsShards,
                         device: torch.device) -> None:
    """``owner``'s own meta buffers: from the checkpoint, else from ``model._init_weights(owner)``."""
    meta = [name for name, b in owner.named_buffers(recurse=False) if b is not None and b.is_meta]
    if not meta:
        return
    values = shards.read([_qualified(owner_name, name) for name in meta if _qualified(owner_name, name) in shards])
    for name in meta:
        buffer, key = getattr(owner, name), _qualified(owner_name, name)
        value = values[key].to(buffer.dtype) if key in values else torch.empty_like(buffer, device=device)
        owner.register_buffer(name, value.to(device), persistent=name not in owner._non_persistent_buffers_set)
    if len(values) < len(meta):
        initialise = getattr(model, "_init_weights", None)
        if initialise is None or any(p.is_meta for p in owner.parameters(recurse=False)):
            raise ValueError(f"{owner_name}: buffers {meta} are neither in the checkpoint nor computed by the "
                             "model's _init_weights")
        with torch.no_grad():
            initialise(owner)


def release(part: nn.Module) -> None:
    """``part``'s parameters, and buffers other than its quantizers' state, back on the meta device."""
    quantizer_buffers = {id(b) for m in part.modules() if isinstance(m, TensorQuantizer) for b in m.buffers()}
    for module in part.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and id(buffer) not in quantizer_buffers:
                module.register_buffer(name, torch.empty_like(buffer, device="meta"),
                                       persistent=name not in module._non_persistent_buffers_set)
