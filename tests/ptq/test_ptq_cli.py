"""``lowbit ptq`` end to end on the bundled model, one run per qformat: exit 0, the export loads back (its
weights and static scales equal the in-memory model's), the report beside it holds finite numbers that agree
with an independent recomputation, and bad arguments exit 2 naming the argument, with nothing written."""

import contextlib
import io
import json
import math

import pytest
import torch

from lowbit import quantize
from lowbit.assets import load_default_model
from lowbit.cli import main
from lowbit.data import calibration_batches, default_calibration_text, default_eval_text, make_forward_loop
from lowbit.eval import divergence
from lowbit.export import load_quantized
from lowbit.hf import load_causal_lm
from lowbit.ptq import run as ptq_run
from lowbit.ptq.qformats import EXPORTS, QFORMATS, ptq_config
from lowbit.ptq.run import report_path

SMALL = ["--calib-size", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "128", "--no-progress"]
HEAVY = {"int4_awq", "int4_gptq", "w4a8_awq", "nvfp4_awq"}  # layer-wise algorithms: 4-6 s each on 2 cores


@pytest.fixture(autouse=True)
def keep_the_allocator(monkeypatch):
    """The CLI fixes glibc's mmap threshold for honest peak memory; the test process keeps its own (the
    measurement is tested in a subprocess in test_memory_estimate.py)."""
    monkeypatch.setattr(ptq_run, "return_large_frees", lambda: False)


def run_cli(argv: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["ptq", *argv]) == 0
    return stdout.getvalue()


def finite_numbers(record) -> list[float]:
    if isinstance(record, dict):
        return [x for value in record.values() for x in finite_numbers(value)]
    if isinstance(record, list):
        return [x for value in record for x in finite_numbers(value)]
    return [record] if isinstance(record, float) else []


@pytest.mark.parametrize("qformat", [pytest.param(q, marks=pytest.mark.slow) if q in HEAVY else q for q in QFORMATS])
def test_every_qformat_runs_exports_and_loads_back(tmp_path, qformat):
    export_dir = tmp_path / "export"
    stdout = run_cli(["--model", "default", "--qformat", qformat, "--export-path", str(export_dir), *SMALL])
    assert "reloaded: weights" in stdout
    report = json.loads(report_path(export_dir).read_text())
    assert all(math.isfinite(x) for x in finite_numbers(report))
    float_row, quantized_row = report["rows"]
    assert float_row["kl"] == 0.0 and quantized_row["kl"] > 0.0
    assert 1.0 < float_row["perplexity"] < quantized_row["perplexity"] * 1.5
    assert report["export"]["format"] == EXPORTS[qformat][0]
    assert report["export"]["seconds"]["write"] > 0 and report["export"]["seconds"]["reload"] > 0
    assert report["export"]["weights_difference"] <= 1e-5
    assert report["plan"]["bytes_after"] < report["plan"]["bytes_before"]
    loader = load_causal_lm if report["export"]["format"] == "lowbit" else load_quantized
    reloaded = loader(export_dir)
    reloaded = reloaded[0] if isinstance(reloaded, tuple) else reloaded
    with torch.no_grad():
        logits = reloaded(input_ids=torch.arange(16)[None]).logits
    assert torch.isfinite(logits).all()


def test_report_kl_equals_an_independent_computation(tmp_path):
    """The KL in the report is what lowbit.eval.divergence gives for the same quantization done here."""
    export_dir = tmp_path / "export"
    run_cli(["--model", "default", "--qformat", "int8_wo", "--export-path", str(export_dir), *SMALL])
    report = json.loads(report_path(export_dir).read_text())
    model, tokenizer = load_default_model()
    reference, _ = load_default_model()
    batches = calibration_batches(tokenizer, default_calibration_text(), 2, 32, 2)
    quantize(model, ptq_config("int8_wo"), make_forward_loop(batches, progress=False))
    scores = divergence(model, reference, tokenizer, default_eval_text(), seq_len=32, stride=16, max_tokens=128,
                        progress=False)
    assert report["rows"][1]["kl"] == pytest.approx(scores.mean_kl, rel=1e-6)
    assert report["rows"][0]["perplexity"] == pytest.approx(scores.reference_perplexity, rel=1e-9)


@pytest.mark.parametrize(("kv", "export_format"), [("fp8", "hf"), ("fp8", "compressed-tensors"), ("nvfp4", "hf")])
def test_kv_cache_formats_export_reload_and_report_their_kl(tmp_path, kv, export_format):
    export_dir = tmp_path / "export"
    run_cli(["--model", "default", "--qformat", "fp8", "--kv-cache-qformat", kv, "--export-format", export_format,
             "--export-path", str(export_dir), *SMALL])
    report = json.loads(report_path(export_dir).read_text())
    with_kv, kv_float = report["rows"][1], report["rows"][2]
    assert "KV cache float" in kv_float["model"]
    assert with_kv["kl"] > kv_float["kl"] > 0  # the KV cache adds its own error on top of the weights'
    reloaded = load_quantized(export_dir)
    attention = reloaded.model.layers[0].self_attn
    assert attention.k_bmm_quantizer.is_enabled and attention.v_bmm_quantizer.is_enabled
    assert attention.k_bmm_quantizer.config.format_name == ("nvfp4" if kv == "nvfp4" else "e4m3")
    config = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    if export_format == "hf":
        hf_config = json.loads((export_dir / "hf_quant_config.json").read_text())
        assert hf_config["quantization"]["kv_cache_quant_algo"] == kv.upper()
    else:
        assert config["kv_cache_scheme"]["num_bits"] == 8 and config["kv_cache_scheme"]["type"] == "float"


def test_exported_tokenizer_keeps_its_padding_side_with_left_padded_jsonl_calibration(tmp_path):
    samples = tmp_path / "calib.jsonl"
    lines = default_calibration_text().split("\n\n")[:6]
    samples.write_text("\n".join(json.dumps({"text": line[: 40 + 30 * i]}) for i, line in enumerate(lines)))
    export_dir = tmp_path / "export"
    _, tokenizer = load_default_model()
    run_cli(["--model", "default", "--qformat", "fp8", "--calib-data", str(samples), "--calib-size", "4",
             "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "128", "--no-progress",
             "--export-path", str(export_dir)])
    saved = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert saved.get("padding_side", "right") == tokenizer.padding_side


@pytest.mark.parametrize(("argv", "words"), [
    (["--qformat", "int3"], ["--qformat", "'int3'", "nvfp4"]),
    (["--qformat", "fp8", "--kv-cache-qformat", "int4"], ["--kv-cache-qformat", "'int4'"]),
    (["--qformat", "fp8", "--calib-size", "0"], ["--calib-size", "positive integer", "0"]),
    (["--qformat", "fp8", "--model", "MISSING"], ["--model", "MISSING", "config.json"]),
    (["--qformat", "mxfp4", "--export-format", "hf"], ["--export-format", "'hf'", "mxfp4", "lowbit"]),
    (["--qformat", "fp8", "--kv-cache-qformat", "nvfp4", "--export-format", "compressed-tensors"],
     ["compressed-tensors", "nvfp4 KV cache"]),
    (["--qformat", "fp8", "--auto-quantize-bits", "3", "--quant", "int4_awq,fp8"],
     ["--auto-quantize-bits 3", "int4_awq", "4.125"]),
    (["--qformat", "fp8", "--auto-quantize-bits", "5"], ["--quant"]),
    (["--qformat", "fp8", "--low-memory-mode", "--export-format", "hf"], ["--low-memory-mode", "'hf'", "lowbit"]),
    (["--qformat", "fp8", "--tasks", "quant,mmlu"], ["--tasks", "'mmlu'"]),
    (["--qformat", "fp8", "--calib-data", "calib.csv"], ["--calib-data", ".jsonl"]),
])
def test_bad_arguments_exit_2_with_a_clear_message_and_write_nothing(tmp_path, capsys, argv, words):
    export_dir = tmp_path / "export"
    full = ["ptq", "--model", "default", "--export-path", str(export_dir), *argv]
    if argv.count("--model"):
        full = ["ptq", "--export-path", str(export_dir), *argv]
    with pytest.raises(SystemExit) as exit_info:
        main(full)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    for word in words:
        assert word in message
    assert not export_dir.exists() and not report_path(export_dir).exists()
    assert list(tmp_path.iterdir()) == []


def test_dry_run_lists_rules_float_layers_and_estimates_and_writes_nothing(tmp_path):
    export_dir = tmp_path / "export"
    stdout = run_cli(["--model", "default", "--qformat", "int4_awq", "--kv-cache-qformat", "fp8", "--dry-run",
                      "--export-path", str(export_dir)])
    assert "rule '*weight_quantizer': 56 quantizer(s)" in stdout
    assert "rule '*[kv]_bmm_quantizer': 16 quantizer(s)" in stdout
    assert "float: lm_head.weight_quantizer [4096, 256]: rule '*lm_head*' disables it" in stdout
    assert "float: model.embed_tokens.weight [4096, 256]: embedding" in stdout
    assert "estimated host peak" in stdout and "estimated calibration" in stdout
    assert list(tmp_path.iterdir()) == []
