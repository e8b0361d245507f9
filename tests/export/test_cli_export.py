"""``lowbit quantize --export-format``: dispatches through the registry, writes the export, checks it reloads."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from lowbit.cli import main
from lowbit.export import load_quantized

SMALL = ["--calib-samples", "2", "--seq-len", "64", "--eval-tokens", "0", "--no-progress"]


@pytest.mark.parametrize(("export_format", "quant_method"), [("hf", "modelopt"),
                                                             ("compressed-tensors", "compressed-tensors")])
def test_quantize_exports_and_the_export_reloads(tmp_path, export_format, quant_method):
    output = tmp_path / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["quantize", "default", "--preset", "FP8_PER_CHANNEL_PER_TOKEN", "--output", str(output),
                     "--export-format", export_format, *SMALL]) == 0
    assert f"exported {export_format} to {output}" in stdout.getvalue()
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == quant_method
    assert (output / "tokenizer.json").is_file()
    model = load_quantized(output)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_packed_and_export_format_conflict_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "default", "--preset", "FP8_DEFAULT", "--output", str(tmp_path / "o"), "--packed",
              "--export-format", "hf", *SMALL])
    assert "--packed and --export-format hf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "default", "--preset", "FP8_DEFAULT", "--output", str(tmp_path / "o"),
              "--export-format", "nope", *SMALL])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
