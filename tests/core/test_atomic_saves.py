"""Every writer is all or nothing: a failure halfway leaves no new directory and an old one as it was, and a
non-empty directory that lowbit did not write is refused unless overwrite=True."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lowbit
from lowbit import checkpoint, hf
from lowbit.compress import serialization
from lowbit.compress.convert import compress
from lowbit.files import MARKER

from .helpers import mlp, tiny_llama

INT4_G32 = {"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 32}}, "default": {"enable": False}},
            "algorithm": "max"}


class FileTokenizer:
    """Stands in for a tokenizer: ``save_pretrained`` writes one file, or fails after writing it."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_pretrained(self, directory) -> None:
        (Path(directory) / "tokenizer.json").write_text("{}")
        if self.fail:
            raise OSError("disk full while writing the tokenizer")


def _save(path, overwrite=False):
    return lowbit.save(lowbit.quantize(mlp(), INT4_G32), path, overwrite=overwrite)


def _save_compressed(path, overwrite=False):
    return lowbit.save_compressed(compress(lowbit.quantize(mlp(), INT4_G32)), path, overwrite=overwrite)


def _save_hf(path, overwrite=False, packed=False, tokenizer=None):
    model = lowbit.quantize(tiny_llama(num_layers=1, hidden=32), INT4_G32)
    return hf.save_quantized(model, tokenizer or FileTokenizer(), path, packed=packed, overwrite=overwrite)


def _save_hf_packed(path, overwrite=False):
    return _save_hf(path, overwrite, packed=True)


# writer, the module whose safetensors writer the test makes fail
WRITERS = {"save": (_save, checkpoint), "save_compressed": (_save_compressed, serialization),
           "hf.save_quantized": (_save_hf, checkpoint), "hf.save_quantized packed": (_save_hf_packed, serialization)}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _failing_tensor_write(model, filename, *args, **kwargs):
    """Writes half a file where safetensors' ``save_model`` would write the tensors, then fails as a full disk
    would."""
    Path(filename).write_bytes(b"\0" * 100)
    raise OSError("No space left on device")


@pytest.mark.parametrize("writer", list(WRITERS))
def test_tensor_write_failing_halfway_leaves_nothing_and_the_old_directory_intact(tmp_path, monkeypatch, writer):
    write, module = WRITERS[writer]
    old = write(tmp_path / "old")
    old_files = _files(old)
    monkeypatch.setattr(module, "save_model", _failing_tensor_write)
    for target in (tmp_path / "new", old):
        with pytest.raises(OSError, match="No space left"):
            write(target)
    assert not (tmp_path / "new").exists()
    assert _files(old) == old_files
    assert [p.name for p in tmp_path.iterdir()] == ["old"]  # no staging directory left beside it


def test_hf_save_failing_after_the_tensors_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match="tokenizer"):
        _save_hf(tmp_path / "out", tokenizer=FileTokenizer(fail=True))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_foreign_non_empty_directory_is_refused_unless_overwrite(tmp_path, writer):
    write, _ = WRITERS[writer]
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write(tmp_path)
    assert _files(tmp_path) == {"notes.txt": b"mine"}
    write(tmp_path, overwrite=True)
    assert MARKER in _files(tmp_path) and "notes.txt" not in _files(tmp_path)
    write(tmp_path)  # lowbit wrote it now: rewriting needs no overwrite


def test_a_saved_directory_still_restores_exactly(tmp_path):
    model = lowbit.quantize(mlp(), INT4_G32)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    restored = lowbit.restore(mlp(seed=9), lowbit.save(model, tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
