"""``lowbit quantize`` / ``lowbit eval`` on the bundled model: saved directories reload to the same model,
and the printed perplexities equal an independent in-process computation."""

import contextlib
import io
import json

import pytest
import torch

from lowbit import quantize
from lowbit.assets import load_default_model
from lowbit.cli import main
from lowbit.commands import check_reload, quantize_config
from lowbit.convert import fold_weight
from lowbit.data import calibration_batches, default_calibration_text, default_eval_text, make_forward_loop
from lowbit.eval import divergence, perplexity
from lowbit.hf import load_causal_lm, saved_kind
from lowbit.presets import get_preset

SMALL = ["--calib-samples", "4", "--seq-len", "64", "--eval-tokens", "512", "--no-progress"]
PPL_TOLERANCE = 5e-3  # printed with 3 decimals


def run_cli(argv: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return stdout.getvalue()


def printed_perplexities(stdout: str) -> list[float]:
    """The perplexity column of the table ``lowbit quantize`` / ``eval`` print."""
    lines = stdout.splitlines()
    column = lines[0].split().index("perplexity")
    return [float(line.split()[column]) for line in lines[2:] if line and not line.startswith("saved")]


def printed_column(stdout: str, name: str) -> float:
    """The number under header ``name`` in the first row of a printed table (numbers are right-aligned)."""
    header, _, row = stdout.splitlines()[:3]
    return float(row[: header.index(name) + len(name)].split()[-1])


def quantized_in_process(preset: str):
    """The same quantization done in this process: (folded quantized model, tokenizer)."""
    model, tokenizer = load_default_model()
    batches = calibration_batches(tokenizer, default_calibration_text(), num_samples=4, seq_len=64)
    quantize(model, get_preset(preset), make_forward_loop(batches, progress=False))
    return fold_weight(model), tokenizer


def reference_perplexity(preset: str) -> float:
    """The same quantization done in this process, evaluated on the same tokens."""
    model, tokenizer = quantized_in_process(preset)
    return perplexity(model, tokenizer, default_eval_text(), seq_len=64, stride=32, max_tokens=512, progress=False)


@pytest.mark.parametrize(("preset", "packed", "kind"), [
    ("INT8_DEFAULT_CFG", False, "fake_quant"),
    ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", True, "packed"),
])
def test_quantize_then_eval_reproduces_the_in_process_result(tmp_path, preset, packed, kind):
    output = tmp_path / "out"
    stdout = run_cli(["quantize", "default", "--preset", preset, "--output", str(output), *SMALL]
                     + (["--packed"] if packed else []))
    original, quantized = printed_perplexities(stdout)
    expected = reference_perplexity(preset)
    assert quantized == pytest.approx(expected, abs=PPL_TOLERANCE)
    assert quantized > original - 0.5
    assert saved_kind(output) == kind
    evaluated = printed_perplexities(run_cli(["eval", str(output), "--seq-len", "64", "--eval-tokens", "512",
                                              "--no-progress"]))
    assert evaluated == [pytest.approx(expected, abs=PPL_TOLERANCE)]


def test_eval_against_the_float_model_and_against_a_saved_topk_reference(tmp_path):
    output, reference = tmp_path / "out", tmp_path / "reference.safetensors"
    run_cli(["quantize", "default", "--preset", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "--output", str(output), *SMALL])
    window = ["--seq-len", "64", "--eval-tokens", "256", "--no-progress"]
    quantized, tokenizer = quantized_in_process("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    expected = divergence(quantized, load_default_model()[0], tokenizer, default_eval_text(), seq_len=64, stride=32,
                          max_tokens=256, progress=False)
    full = run_cli(["eval", str(output), "--reference", "float", *window])
    assert printed_column(full, "KL") == pytest.approx(expected.mean_kl, abs=1e-5)  # printed with 5 decimals
    assert printed_column(full, "top-1 %") == pytest.approx(100 * expected.top1, abs=0.01)
    assert printed_column(full, "d ppl") == pytest.approx(expected.perplexity_delta, abs=PPL_TOLERANCE)

    saved = run_cli(["eval", "default", "--save-reference", str(reference), "--top-k", "64", *window])
    assert printed_column(saved, "top-k") == 64 and printed_column(saved, "positions") == 255
    from_file = run_cli(["eval", str(output), "--reference", str(reference), *window])
    lower, bound = printed_column(from_file, "KL"), printed_column(from_file, "KL tail bound")
    assert lower - 1e-5 <= expected.mean_kl <= lower + bound + 2e-5
    assert printed_column(from_file, "top-1 %") == pytest.approx(100 * expected.top1, abs=0.01)

    config = json.loads((output / "config.json").read_text())
    del config["lowbit_float_model"]
    (output / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(output), "--reference", "float", *window])
    assert exit_info.value.code == 2


def test_check_reload_catches_a_model_that_differs_from_the_saved_one(tmp_path):
    model, tokenizer = load_default_model()
    batches = calibration_batches(tokenizer, default_calibration_text(), num_samples=2, seq_len=32)
    run_cli(["quantize", "default", "--preset", "INT8_WEIGHT_ONLY_CFG", "--output", str(tmp_path / "a"), *SMALL])
    reloaded, _ = load_causal_lm(tmp_path / "a")
    assert check_reload(reloaded, tmp_path / "a", batches[0], torch.float32) == 0.0
    with torch.no_grad():
        reloaded.lm_head.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="logits .* away"):
        check_reload(reloaded, tmp_path / "a", batches[0], torch.float32)


def test_algorithm_option_replaces_the_presets_algorithm(tmp_path):
    assert quantize_config("int4_awq", None, "gptq")["algorithm"] == "gptq"
    options = quantize_config("int4_awq", None, '{"method": "gptq", "block_size": 64}')["algorithm"]
    assert options == {"method": "gptq", "block_size": 64}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(get_preset("FP8_DEFAULT_CFG")))
    assert quantize_config(None, str(path), None) == json.loads(json.dumps(get_preset("FP8_DEFAULT_CFG")))


@pytest.mark.parametrize(("argv", "message"), [
    (["quantize", "default", "--output", "{out}"], "exactly one of --preset"),
    (["quantize", "default", "--preset", "int8_default", "--config", "x.json", "--output", "{out}"],
     "exactly one of --preset"),
    (["quantize", "default", "--preset", "int9", "--output", "{out}"], "preset 'int9' is unknown"),
    (["quantize", "default", "--config", "{missing}", "--output", "{out}"], "no such file"),
    (["quantize", "default", "--preset", "int8_default", "--output", "{full}"], "--overwrite"),
    (["eval", "{missing}"], "not a local Hugging Face model directory"),
    (["eval", "default", "--reference", "{missing_reference}"], "missing.safetensors' does not exist"),
    (["eval", "default", "--reference", "float", "--save-reference", "{missing_reference}"], "not both"),
])
def test_bad_arguments_exit_with_a_message(tmp_path, capsys, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    paths = {"out": tmp_path / "out", "missing": tmp_path / "missing.json", "full": tmp_path / "full",
             "missing_reference": tmp_path / "missing.safetensors"}
    with pytest.raises(SystemExit) as exit_info:
        main([part.format(**paths) for part in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_a_foreign_output_directory(tmp_path):
    output = tmp_path / "full"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    run_cli(["quantize", "default", "--preset", "INT8_WEIGHT_ONLY_CFG", "--output", str(output), "--overwrite", *SMALL])
    assert saved_kind(output) == "fake_quant" and not (output / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no staging directory left
