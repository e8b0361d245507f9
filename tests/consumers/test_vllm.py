"""vLLM (CPU build) loads and generates from lowbit's exports of the bundled model and computes its model.

Runs ``bench/export_vllm.py`` (its docstring has the protocol) once per case in a subprocess, one vLLM engine
per export, and shares the row between this module's tests: 8 tokens generated; vLLM's prompt log-probabilities
of 128 held-out tokens closer to lowbit's in-memory quantized model than to the float model, and within 0.05 nats
mean absolute of it.

Strict expected failure, measured (bench/results/vllm_fp8_dtypes_2026-12-07b.md, after
vllm_fp8_numerics_2026-12-07.md): FP8 with dynamic per-token activations misses 0.05 (compressed-tensors in
float32 0.054; ModelOpt 0.070, 0.067 against lowbit run in bfloat16 as vLLM runs it, which takes only bfloat16
and float16 for ModelOpt), though closer to lowbit than to the float model. Since lowbit forms codes as
``x / step`` (step = amax / 448, the scale the export stores; bench/results/code_rule_ties_2026-12-07.md), its
FP8 exports equal ModelOpt's bit for bit and these two cases measure 0.058 (compressed-tensors) and 0.083 (ModelOpt),
the latter what ModelOpt's own export gives. The arithmetic analysis below predates that change. vLLM runs the two
exports bit-identically in the same dtype. vLLM's CPU FP8 linear (``QuantFP8.forward_native`` +
``ChannelWiseTorchFP8ScaledMMLinearKernel``) uses lowbit's codes and scales and differs by float32 rounding
only: activation codes ``x * (1 / (amax / 448))`` against lowbit's then ``x * (448 / amax)`` (1 code in 33,024 at
layer 0), and the GEMM on codes before the scales where fake quantization (ModelOpt's) multiplies dequantized
operands. Making lowbit's activation rounding vLLM's gives 0.056; only vLLM's whole float32 linear (GEMM on codes)
gets under 0.05 (0.024), in float32 only (0.078 in bfloat16, where vLLM's attention and fused residual + RMSNorm
round differently from transformers'). On this model any one-ulp difference grows through the E4M3 activation
codes of 8 layers to ~0.05-0.09 nats: lowbit under a 1e-7 perturbation of its embeddings 0.047-0.062, vLLM
against itself in another dtype 0.072-0.087, ModelOpt 0.47's own export in vLLM against ModelOpt's own
in-memory model 0.073-0.088.

Mixed precision runs as compressed-tensors mixed-precision (W8A8 INT8 + W4A16, both with CPU kernels). ModelOpt
MIXED_PRECISION is not a case here: vLLM 0.32 CPU has a kernel for no ModelOpt format besides
FP8_PER_CHANNEL_PER_TOKEN, so no two ModelOpt formats run together (bench/export_vllm.py's case
"modelopt MIXED_PRECISION" records the failure; 3 minutes of CI for a known outcome).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.consumer, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.05
FP8_CHAOS = pytest.mark.xfail(strict=True, reason="FP8 per-token activations: any one-ulp difference moves this "
                              "model's logprobs 0.05-0.09 nats; ModelOpt's own export misses by more (module "
                              "docstring, bench/results/vllm_fp8_dtypes_2026-12-07b.md)")
FP8_PER_TOKEN = ["modelopt FP8_PER_CHANNEL_PER_TOKEN", "compressed-tensors FP8"]
RUNNING = ["modelopt FP8_PER_CHANNEL_PER_TOKEN", "compressed-tensors W8A8 INT8 SmoothQuant",
           "compressed-tensors W4A16 g128 GPTQ", "compressed-tensors FP8",
           "compressed-tensors mixed-precision W8A8 INT8 + W4A16"]
AGREEING = [pytest.param(case, marks=FP8_CHAOS) if case in FP8_PER_TOKEN else case for case in RUNNING]


@pytest.fixture(scope="module")
def bench_row(tmp_path_factory):
    """The bench's row for a case, run once per module (vLLM takes minutes per export on 2 cores)."""
    workdir, rows = tmp_path_factory.mktemp("vllm"), {}

    def row(case: str) -> dict:
        if case not in rows:
            out = workdir / f"{len(rows)}.json"
            environment = {**os.environ, "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, str(ROOT / "bench" / "export_vllm.py"), "--case", case, "--json",
                            str(out)], check=True, env=environment, timeout=900)
            rows[case] = json.loads(out.read_text())["rows"][0]
        return rows[case]

    return row


@pytest.mark.parametrize("case", RUNNING)
def test_vllm_loads_and_generates(bench_row, case):
    row = bench_row(case)
    assert row["error"] is None, row["error"]
    assert row["generated"] == 8


@pytest.mark.parametrize("case", RUNNING)
def test_vllm_closer_to_lowbit_than_to_float(bench_row, case):
    row = bench_row(case)
    assert row["error"] is None, row["error"]
    assert row["vllm_vs_lowbit"] < row["vllm_vs_float"], row


@pytest.mark.parametrize("case", AGREEING)
def test_vllm_agrees_with_lowbit(bench_row, case):
    row = bench_row(case)
    assert row["error"] is None, row["error"]
    assert row["vllm_vs_lowbit"] <= TOLERANCE, row
