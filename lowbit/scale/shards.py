"""A model built on the meta device and given its weights one part at a time, from the safetensors shards of a
Hugging Face directory.

- :func:`meta_model`: the architecture of ``directory/config.json``, every parameter and buffer on the meta
  device (no memory);
- :class:`SafetensorsShards`: which shard holds each tensor (``model.safetensors.index.json``, or the single
  ``model.safetensors``); :meth:`SafetensorsShards.read` memory-maps the shards a part needs, copies its tensors
  and closes them again, so the host holds the part's bytes only while they are copied;
- :func:`materialise`: a part's parameters (and persistent buffers) from the shards, on a device, in the
  parameter's dtype; non-persistent buffers (rotary ``inv_freq``) from the model's own ``_init_weights``;
- :func:`release`: a part's parameters back on the meta device (its quantizers' calibrated state stays).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lowbit.quantizer import TensorQuantizer

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
                self.file_of = {name: self.directory / file for name, file in
                                json.loads(index.read_text())["weight_map"].items()}
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({error})") from None
        elif single.is_file():
            with safe_open(single, framework="pt") as handle:
                self.file_of = dict.fromkeys(handle.keys(), single)
        else:
            raise FileNotFoundError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE}: quantize_layerwise "
                                    "reads safetensors checkpoints")

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (CPU, stored dtype), each shard memory-mapped only while its tensors are copied."""
        missing = [name for name in names if name not in self.file_of]
        if missing:
            raise KeyError(f"{self.directory}: the checkpoint has no tensor(s) {missing[:5]}")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        tensors = {}
        for file, wanted in by_file.items():
            with safe_open(file, framework="pt") as handle:
                for name in wanted:
                    tensors[name] = handle.get_tensor(name).clone()  # a copy that outlives the mapping
        return tensors


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def materialise(model: nn.Module, part: nn.Module, prefix: str, shards: SafetensorsShards,
                device: torch.device) -> None:
    """Give ``part`` (the module named ``prefix`` in ``model``, or a module outside the block stacks) its
    parameters and persistent buffers from ``shards`` on ``device``, in place; tied parameters stay tied.

    Non-persistent buffers still on the meta device come from ``model._init_weights`` (transformers computes
    rotary frequencies there). KeyError naming the tensor if the checkpoint lacks one.
    """
    parameters = [(name, p) for name, p in part.named_parameters(remove_duplicate=False) if p.is_meta]
    unique = {id(p): name for name, p in reversed(parameters)}  # first name of each tensor
    loaded = shards.read([_qualified(prefix, name) for name in unique.values()])
    replacement = {}
    for key, name in unique.items():
        meta = dict(parameters)[name]
        value = loaded.pop(_qualified(prefix, name)).to(device=device, dtype=meta.dtype)
        replacement[key] = nn.Parameter(value, requires_grad=False)
    for name, parameter in parameters:
        owner, _, leaf = name.rpartition(".")
        setattr(part.get_submodule(owner), leaf, replacement[id(parameter)])
    _materialise_buffers(model, part, prefix, shards, device)


def _materialise_buffers(model: nn.Module, part: nn.Module, prefix: str, shards: SafetensorsShards,
                         device: torch.device) -> None:
    for owner_name, owner in part.named_modules():
        meta = [name for name, b in owner.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        stored = [name for name in meta if _qualified(prefix, _qualified(owner_name, name)) in shards]
        values = shards.read([_qualified(prefix, _qualified(owner_name, name)) for name in stored])
        for name in meta:
            buffer = getattr(owner, name)
            key = _qualified(prefix, _qualified(owner_name, name))
            value = values[key].to(buffer.dtype) if key in values else torch.empty_like(buffer, device=device)
            owner.register_buffer(name, value.to(device), persistent=name not in owner._non_persistent_buffers_set)
        if len(stored) < len(meta):
            initialise = getattr(model, "_init_weights", None)
            if initialise is None or any(p.is_meta for p in owner.parameters(recurse=False)):
                raise ValueError(f"{_qualified(prefix, owner_name)}: buffers {meta} are neither in the checkpoint "
                                 "nor computed by the model's _init_weights")
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
