"""``lowbit ptq --low-memory-mode`` and ``lowbit ptq --auto-quantize-bits`` end to end on the bundled model: exit 0,
the export loads back, the report's numbers are finite and agree with an independent recomputation (perplexity of
the reloaded export; effective bits counted from the chosen formats' plan), and each mode's bad arguments exit 2
with a message naming them, leaving no output directory."""

import json
import math

import pytest
import torch

from lowbit.cli import main
from lowbit.data import default_eval_text
from lowbit.eval import perplexity
from lowbit.hf import load_causal_lm
from lowbit.ptq import run as ptq_run
from lowbit.ptq.run import report_path
from tests.ptq.test_ptq_cli import SMALL, finite_numbers, run_cli


@pytest.fixture(autouse=True)
def keep_the_allocator(monkeypatch):
    """As in test_ptq_cli.py: the test process keeps glibc's own mmap threshold."""
    monkeypatch.setattr(ptq_run, "return_large_frees", lambda: False)


def test_low_memory_mode_writes_a_packed_export_that_loads_back(tmp_path):
    export_dir = tmp_path / "export"
    run_cli(["--model", "default", "--qformat", "fp8", "--low-memory-mode", "--export-path", str(export_dir), *SMALL])
    report = json.loads(report_path(export_dir).read_text())
    assert all(math.isfinite(x) for x in finite_numbers(report))
    assert report["export"]["format"] == "lowbit" and report["export"]["reloaded_logits_finite"]
    assert report["layerwise"]["activation_bytes_on_disk"] == 0  # no budget: every activation in memory
    reloaded, tokenizer = load_causal_lm(export_dir)
    state = json.loads((export_dir / "lowbit_compressed.json").read_text())
    assert len(state["compressed"]) == 56  # every decoder linear packed (7 per block, 8 blocks)
    expected = perplexity(reloaded, tokenizer, default_eval_text(), seq_len=32, stride=16, max_tokens=128,
                          progress=False)
    (row,) = report["rows"]
    assert row["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert 1.0 < row["perplexity"] < 1e4


def test_auto_quantize_bits_meets_its_budget_and_loads_back(tmp_path):
    export_dir = tmp_path / "export"
    stdout = run_cli(["--model", "default", "--qformat", "int8_wo", "--auto-quantize-bits", "6.5",
                      "--quant", "int4_wo,int8_wo", "--export-path", str(export_dir), *SMALL])
    assert "reloaded: weights" in stdout
    report = json.loads(report_path(export_dir).read_text())
    assert all(math.isfinite(x) for x in finite_numbers(report))
    float_row, quantized_row = report["rows"]
    assert quantized_row["model"].startswith("auto_quantize 6.5 bits of int4_wo,int8_wo")
    assert 0.0 < quantized_row["kl"] < 1.0 and 1.0 < float_row["perplexity"]
    assert report["export"]["weights_difference"] <= 1e-5
    search = report["auto_quantize"]
    assert 4.0 < search["effective_bits"] <= 6.5
    chosen = set(search["assignment"].values())
    assert len(chosen) >= 2  # a budget between the two formats' costs mixes them
    reloaded, _ = load_causal_lm(export_dir) if report["export"]["format"] == "lowbit" else (None, None)
    if reloaded is None:
        from lowbit.export import load_quantized

        reloaded = load_quantized(export_dir)
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=torch.arange(16)[None]).logits).all()


@pytest.mark.parametrize(("argv", "words"), [
    (["--qformat", "int8_sq", "--low-memory-mode"], ["--low-memory-mode", "'int8_sq'", "SmoothQuant", "int4_awq"]),
    (["--qformat", "fp8", "--low-memory-mode", "--auto-quantize-bits", "6", "--quant", "int4_wo,int8_wo"],
     ["--low-memory-mode", "--auto-quantize-bits"]),
    (["--qformat", "fp8", "--low-memory-mode", "--export-format", "compressed-tensors"],
     ["--low-memory-mode", "'compressed-tensors'", "lowbit"]),
    (["--qformat", "fp8", "--auto-quantize-bits", "0", "--quant", "int4_wo,int8_wo"],
     ["--auto-quantize-bits 0", "positive"]),
    (["--qformat", "fp8", "--auto-quantize-bits", "6", "--quant", "int4_wo,int5"], ["--quant", "'int5'", "nvfp4"]),
    (["--qformat", "fp8", "--quant", "int4_wo,int8_wo"], ["--auto-quantize-bits", "--quant"]),
    (["--qformat", "fp8", "--auto-quantize-bits", "six", "--quant", "int4_wo"], ["--auto-quantize-bits", "'six'"]),
    (["--qformat", "fp8", "--auto-quantize-bits", "6", "--quant", "int4_wo", "--kv-cache-qformat", "fp8"],
     ["--auto-quantize-bits", "--kv-cache-qformat"]),
])
def test_bad_mode_arguments_exit_2_with_a_clear_message_and_write_nothing(tmp_path, capsys, argv, words):
    export_dir = tmp_path / "export"
    with pytest.raises(SystemExit) as exit_info:
        main(["ptq", "--model", "default", "--export-path", str(export_dir), *argv])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    for word in words:
        assert word in message
    assert list(tmp_path.iterdir()) == []
