"""The layer-wise runner's output, written part by part: the directory ``lowbit.save_compressed`` writes
(``lowbit_compressed.json`` + one ``model.safetensors``, loadable by ``lowbit.load_compressed`` and
``lowbit.hf.load_causal_lm``), without the whole model ever in memory.

Each part (a decoder block once packed, then the modules outside the blocks) goes to its own safetensors file
and its JSON description is kept, names prefixed with the part's place in the model. :meth:`PartWriter.finish`
joins the files into one by copying each tensor's bytes after a combined header (safetensors: 8-byte
little-endian header length, the JSON header with each tensor's dtype, shape and byte range in the data
section, padded with spaces to a multiple of 8, then the data, every byte covered), and deletes the parts.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from torch import nn

from lowbit.compress.serialization import STATE_FILE, TENSOR_FILE, compressed_state
from lowbit.rotation.quarot import check_no_online_rotation

COPY_CHUNK = 16 << 20


def _prefixed(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


class PartWriter:
    """Writes parts into ``directory`` (a staging directory) and joins them into ``save_compressed``'s files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.parts_directory = directory / "parts"
        self.parts_directory.mkdir()
        self.parts: list[tuple[str, Path]] = []
        self.state = {"compressed": {}, "compressed_experts": {}, "quantized": {}}
        self.format_version = None

    def write(self, module: nn.Module, prefix: str) -> None:
        """Describe ``module`` (named ``prefix`` in the model; "" for the root) and write its tensors."""
        check_no_online_rotation(module, "lowbit.quantize_layerwise")
        state = compressed_state(module)
        self.format_version = state["format_version"]
        for key in self.state:
            self.state[key].update({_prefixed(prefix, name): entry for name, entry in state[key].items()})
        file = self.parts_directory / f"part-{len(self.parts):05d}.safetensors"
        save_state(module.state_dict(), file)
        self.parts.append((prefix, file))

    def finish(self) -> int:
        """Write the JSON and the joined tensor file, delete the parts; returns the tensor file's size. (A model
        whose weights all stay fake-quantized, W4A8's chained quantizers, has only "quantized" entries.)"""
        state = {"format_version": self.format_version, **self.state}
        (self.directory / STATE_FILE).write_text(json.dumps(state, indent=1))
        size = join_safetensors(self.parts, self.directory / TENSOR_FILE)
        shutil.rmtree(self.parts_directory)
        return size


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.int64: "I64", torch.float32: "F32", torch.int32: "I32",
                      torch.float16: "F16", torch.bfloat16: "BF16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def save_state(state: dict[str, torch.Tensor], file: Path) -> None:
    """``state`` as a safetensors file, as ``safetensors.torch.save_model`` writes it (a tensor shared under
    several names stored once, each dropped name mapped to the kept one in the metadata), but written tensor
    by tensor from the tensors' own memory: no serialised copy of the whole part (a 368 MB embedding and
    head then cost 368 MB, not twice that)."""
    kept, metadata, seen = {}, {}, {}
    for name, tensor in sorted(state.items()):  # of a shared tensor's names the first in order stays, as there
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            metadata[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor.detach().cpu().contiguous()
    header = {"__metadata__": metadata} if metadata else {}
    names = sorted(kept, key=lambda n: -kept[n].element_size())  # largest elements first: every tensor aligned
    offset = 0
    for name in names:
        tensor = kept[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        length = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + length]}
        offset += length
    with open(file, "wb") as out:
        _write_header(out, header)
        for name in names:
            if kept[name].numel():
                out.write(kept[name].reshape(-1).view(torch.uint8).numpy().data)


def _write_header(out, header: dict) -> None:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    out.write(struct.pack("<Q", len(encoded)))
    out.write(encoded)


def read_header(file: Path) -> tuple[dict, int]:
    """(JSON header, offset of the data section) of a safetensors file."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length)), 8 + length


DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def join_safetensors(parts: list[tuple[str, Path]], target: Path) -> int:
    """One safetensors file holding every part's tensors, each renamed ``prefix.name``, the data copied tensor
    by tensor in chunks (never all in memory). Tensors are laid out by element size, largest first, so each
    starts at a multiple of its element size, as in a file safetensors writes. Metadata entries (safetensors'
    names of dropped shared tensors) are prefixed the same way. Returns the file's size."""
    tensors, metadata = [], {}
    for prefix, file in parts:
        part_header, data_start = read_header(file)
        for key, value in part_header.pop("__metadata__", {}).items():
            metadata[_prefixed(prefix, key)] = _prefixed(prefix, value)
        for name, entry in part_header.items():
            begin, stop = entry["data_offsets"]
            tensors.append((_prefixed(prefix, name), entry, file, data_start + begin, stop - begin))
    tensors.sort(key=lambda t: -DTYPE_BYTES.get(t[1]["dtype"], 8))  # stable: each part's order kept
    header, offset = {}, 0
    for name, entry, _, _, length in tensors:
        header[name] = {**entry, "data_offsets": [offset, offset + length]}
        offset += length
    if metadata:
        header["__metadata__"] = metadata
    with open(target, "wb") as out:
        _write_header(out, header)
        for _, _, file, start, length in tensors:
            _copy_range(file, start, length, out)
    return target.stat().st_size


def _copy_range(file: Path, start: int, length: int, out) -> None:
    with open(file, "rb") as source:
        source.seek(start)
        while length:
            chunk = source.read(min(COPY_CHUNK, length))
            if not chunk:
                raise ValueError(f"{file}: truncated, {length} bytes short")
            out.write(chunk)
            length -= len(chunk)
