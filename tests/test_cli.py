"""``lowbit demo`` end to end on the bundled model (reduced setting), and the command line's errors."""

import contextlib
import io
import json
import math
import subprocess
import sys

import pytest

from lowbit.cli import main, preset_names

NOISE_PCT = 0.5  # a quantized model may score this much better than the original by chance


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "rows.json"
    argv = ["demo", "--presets", "fp8_default,INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "--eval-tokens", "2048",
            "--calib-samples", "8", "--threads", "2", "--no-progress", "--json", str(path)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return {**json.loads(path.read_text()), "stdout": stdout.getvalue()}


def test_demo_rows_hold_real_numbers(demo_output):
    rows = {row["format"]: row for row in demo_output["rows"]}
    assert list(rows) == ["original", "FP8_DEFAULT", "INT4_BLOCKWISE_WEIGHT_ONLY"]
    original, fp8, int4 = rows.values()
    for row in rows.values():
        assert row["error"] is None
        assert math.isfinite(row["perplexity"]) and 1.0 < row["perplexity"] < 4096  # below a uniform guess
        assert row["delta_pct"] >= -NOISE_PCT
        assert row["delta"] == pytest.approx(row["perplexity"] - original["perplexity"])
    assert int4["perplexity"] > fp8["perplexity"]
    assert original["kl"] is None and original["top1"] is None  # the reference itself
    assert 0 < fp8["kl"] < int4["kl"] and fp8["kl"] <= fp8["kl_p99"] and int4["kl"] <= int4["kl_p99"]
    assert 0.5 < int4["top1"] <= fp8["top1"] < 1.0
    assert int4["weight_bytes"] < fp8["weight_bytes"] < original["weight_bytes"]
    assert fp8["seconds"] > 0 and int4["seconds"] > 0
    assert (fp8["weights"], fp8["activations"]) == ("e4m3/tensor", "e4m3/tensor")
    assert (int4["weights"], int4["activations"]) == ("int4/g128", "-")


def test_demo_json_records_the_run(demo_output):
    assert demo_output["command"].startswith("lowbit demo --presets")
    assert {"date", "machine", "torch", "python"} <= set(demo_output)


def test_demo_prints_the_table(demo_output):
    lines = demo_output["stdout"].splitlines()
    assert lines[0].split()[:6] == ["format", "weights", "acts", "KL", "top-1", "%"]
    assert [line.split()[0] for line in lines[2:]] == ["original", "FP8_DEFAULT", "INT4_BLOCKWISE_WEIGHT_ONLY"]

    def column(name: str) -> list[str | None]:  # numbers are right-aligned: a cell ends where its header does
        end = lines[0].index(name) + len(name)
        return [line[:end].split()[-1] if line[end - 1] != " " else None for line in lines[2:]]

    perplexities = [row["perplexity"] for row in demo_output["rows"]]
    assert [float(value) for value in column("ppl")] == pytest.approx(perplexities, rel=1e-3)  # 4 digits
    kl = [row["kl"] for row in demo_output["rows"][1:]]
    assert column("KL")[0] is None and [float(value) for value in column("KL")[1:]] == pytest.approx(kl, rel=1e-3)


def test_preset_names_normalizes_and_rejects():
    assert preset_names(" fp8_default , W4A16_NVFP4_CFG") == ["FP8_DEFAULT_CFG", "W4A16_NVFP4_CFG"]
    with pytest.raises(ValueError, match=r"preset 'FP3' is unknown; allowed are \[.*'FP8_DEFAULT_CFG'"):
        preset_names("FP8_DEFAULT,FP3")
    with pytest.raises(ValueError, match="at least one preset"):
        preset_names(" , ")


def test_unknown_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--presets", "NOT_A_PRESET"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "NOT_A_PRESET" in error and "INT4_BLOCKWISE_WEIGHT_ONLY_CFG" in error


@pytest.mark.parametrize("argv", [["demo", "--eval-tokens", "0"], ["demo", "--calib-samples", "x"], []])
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "lowbit", "demo", "--presets", "NOPE"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "preset 'NOPE' is unknown" in result.stderr
