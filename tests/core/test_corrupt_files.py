"""Corrupt checkpoints: every loader (restore, load_compressed, hf.load_causal_lm) names the file, says what is
wrong (missing, truncated, not JSON, missing key, unknown format_version, tensors that do not fit) and who wrote
it, and changes no module of the model it was given."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import hf
from lowbit.compress.convert import compress
from lowbit.files import MARKER

from .helpers import assert_untouched, mlp, snapshot, tiny_llama

INT4_G32 = {"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 32}}, "default": {"enable": False}},
            "algorithm": "max"}
TENSORS = "model.safetensors"


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _edit_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(file: Path) -> None:
        state = json.loads(file.read_text())
        edit(state)
        file.write_text(json.dumps(state))
    return apply


def _edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(file: Path) -> None:
        tensors = load_file(str(file))
        edit(tensors)
        save_file(tensors, str(file))
    return apply


def _first_module(state: dict, key: str) -> dict:
    return next(iter(state[key].values()))


# case: (file, how it is damaged, what the message must say besides the file's name)
COMMON = {
    "truncated tensors": (TENSORS, _truncate, "truncated or corrupt.*incomplete metadata"),
    "tensors not safetensors": (TENSORS, lambda f: f.write_bytes(b"PK\x03\x04 a zip, say"), "not a readable"),
    "tensors missing": (TENSORS, Path.unlink, "no such file"),
    "truncated JSON": ("state", _truncate, "not JSON"),
    "JSON not an object": ("state", lambda f: f.write_text("[1, 2]"), "expected a JSON object"),
    "unknown format_version": ("state", _edit_json(lambda s: s.update(format_version=7)), "format_version 7"),
    "tensor of another shape": (TENSORS, _edit_tensors(lambda t: t.update({"fc2.bias": torch.zeros(3)})),
                                r"'fc2.bias' is torch.float32 \(3,\), but .* expects torch.float32 \(64,\)"),
    "tensor missing": (TENSORS, _edit_tensors(lambda t: t.pop("fc2.bias")), r"missing \['fc2.bias'\]"),
    "tensor the model lacks": (TENSORS, _edit_tensors(lambda t: t.update({"fc3.weight": torch.ones(2)})),
                               r"does not have \['fc3.weight'\]"),
}
RESTORE_CASES = {
    **COMMON,
    "JSON missing 'modules'": ("state", _edit_json(lambda s: s.pop("modules")), r"missing key\(s\) \['modules'\]"),
    "module entry missing 'quantizers'": (
        "state", _edit_json(lambda s: _first_module(s, "modules").pop("quantizers")), "'fc1' lacks the key"),
    "bad saved attributes": (
        "state", _edit_json(lambda s: _first_module(s, "modules")["quantizers"]["weight_quantizer"]["attributes"]
                            .update(num_bits=99)), "'fc1' has a bad quantizer state.*num_bits=99"),
    "integer tensor for a float weight": (
        TENSORS, _edit_tensors(lambda t: t.update({"fc2.bias": torch.zeros(64, dtype=torch.int32)})),
        "'fc2.bias' is torch.int32"),
}
COMPRESSED_CASES = {
    **COMMON,
    "JSON missing 'compressed'": ("state", _edit_json(lambda s: s.pop("compressed")), r"\['compressed'\]"),
    "compressed entry missing a key": (
        "state", _edit_json(lambda s: _first_module(s, "compressed").pop("in_features")), "'fc1' lacks the key"),
    "JSON shape not the tensors'": (
        "state", _edit_json(lambda s: _first_module(s, "compressed").update(in_features=32)),
        r"'fc1.weight_codes' is torch.uint8 \(128, 32\), but .*lowbit_compressed.json \(or the model\) expects "
        r"torch.uint8 \(128, 16\)"),
    "codes of another dtype": (
        TENSORS, _edit_tensors(lambda t: t.update({"fc1.weight_codes": t["fc1.weight_codes"].to(torch.int16)})),
        "'fc1.weight_codes' is torch.int16 .* expects torch.uint8"),
}


def _saved(tmp_path: Path, packed: bool) -> Path:
    model = lowbit.quantize(mlp(), INT4_G32)
    if packed:
        return lowbit.save_compressed(compress(model), tmp_path / "saved")
    return lowbit.save(model, tmp_path / "saved")


def _check(tmp_path, case, load, packed, state_file, writer):
    file_name, damage, problem = case
    file_name = state_file if file_name == "state" else file_name
    directory = _saved(tmp_path, packed)
    damage(directory / file_name)
    model = mlp(seed=11)
    before = snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load(model, directory)
    message = str(error.value)
    assert str(directory / file_name) in message
    assert re.search(problem, message), message
    assert f"{MARKER} marker says {writer} wrote it" in message, message
    assert_untouched(model, before)


@pytest.mark.parametrize("case", list(RESTORE_CASES))
def test_restore_names_the_file_and_the_problem(tmp_path, case):
    _check(tmp_path, RESTORE_CASES[case], lowbit.restore, False, "lowbit_quant_state.json", "lowbit.save")


@pytest.mark.parametrize("case", list(COMPRESSED_CASES))
def test_load_compressed_names_the_file_and_the_problem(tmp_path, case):
    _check(tmp_path, COMPRESSED_CASES[case], lowbit.load_compressed, True, "lowbit_compressed.json",
           "lowbit.save_compressed")


def test_a_directory_without_marker_says_who_should_have_written_it(tmp_path):
    directory = _saved(tmp_path, packed=False)
    (directory / MARKER).unlink()
    _truncate(directory / TENSORS)
    with pytest.raises(ValueError, match=f"expected a directory written by lowbit.save; it has no .*{MARKER}"):
        lowbit.restore(mlp(), directory)


@pytest.mark.parametrize("packed", [False, True])
def test_hf_loading_names_the_damaged_file(tmp_path, packed):
    from lowbit.assets import load_default_model

    _, tokenizer = load_default_model()
    model = lowbit.quantize(tiny_llama(num_layers=1, hidden=32), INT4_G32)
    directory = hf.save_quantized(model, tokenizer, tmp_path / "hf", packed=packed)
    assert hf.saved_kind(directory) == ("packed" if packed else "fake_quant")
    _truncate(directory / TENSORS)
    with pytest.raises(ValueError, match=f"{TENSORS}: not a readable .*lowbit.hf.save_quantized wrote it"):
        hf.load_causal_lm(directory)
