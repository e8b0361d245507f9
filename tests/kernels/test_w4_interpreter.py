"""The Triton W4A16 kernels (``w4_matmul``, ``w4_gemv``, ``w4_dequantize``) on the CPU, under Triton's interpreter,
against float64 products of lowbit.formats' dequantized weights: the kernel files' logic checked without a GPU
(the interpreter runs the plain-math branch of the nibble decoders, ``use_inline_asm() == False``; the inline PTX
is covered by ``test_nibbles.py``'s emulator and, on CUDA, ``test_triton_w4.py``).

``TRITON_INTERPRET`` is read when the kernels are decorated, so the check runs in a fresh interpreter process.
Skipped where triton is not installed (CI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

SCRIPT = r"""
import json
import torch
from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.kernels import dispatch, triton_w4

FORMATS = {"int4-g128": WeightFormat("int", 4, block_size=128), "int4-g32": WeightFormat("int", 4, block_size=32),
           "asym-g64": WeightFormat("int_asym", 4, block_size=64),
           "nvfp4": WeightFormat("nvfp4", (2, 1), block_size=16)}
MATMUL = [dict(BLOCK_N=64, BLOCK_M=16, SPLIT_K=1, num_warps=4, num_stages=1, X_PERMUTED=False),
          dict(BLOCK_N=32, BLOCK_M=16, SPLIT_K=2, num_warps=4, num_stages=1, X_PERMUTED=True)]
GEMV = [dict(BLOCK_N=32, SPLIT_K=1), dict(BLOCK_N=32, SPLIT_K=2, UNROLL=1)]


def error(out, reference):
    return ((out.double() - reference).norm() / reference.norm()).item()


generator = torch.Generator().manual_seed(3)
results = []
for name, fmt in FORMATS.items():
    n, k = 72, 512  # N not a multiple of the tiles: the masks
    w = torch.randn(n, k, generator=generator) * 0.05
    w = torch.where(torch.rand(n, k, generator=generator) < 0.01, w * 30, w).to(torch.bfloat16)
    packed = quantize_weight(w, fmt)
    arguments = dispatch.triton_arguments(packed)
    dequantized = packed.dequantize(torch.float64)
    out = triton_w4.w4_dequantize(packed.codes, packed.scale, dtype=torch.float32, **arguments)
    results.append((name, "dequantize", error(out, dequantized), 1e-6))
    bias = torch.randn(n, generator=generator).to(torch.bfloat16)
    for rows, configs, kernel in ((3, MATMUL, triton_w4.w4_matmul), (1, GEMV, triton_w4.w4_gemv)):
        x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
        reference = x.double() @ dequantized.T + bias.double()
        tolerance = 3 * error(reference.to(torch.bfloat16), reference) + 1e-5  # the bf16 output's rounding
        for config in configs:
            if kernel is triton_w4.w4_matmul:
                config = {**config, "SCALE_AFTER_DOT": arguments["group_size"] % 128 == 0 and name != "nvfp4"}
            for _ in range(2):  # split-K leaves its workspace and counters zeroed for the next call
                out = kernel(x, packed.codes, packed.scale, bias=bias, config=config, **arguments)
                results.append((name, f"{kernel.__name__} {config}", error(out, reference), tolerance))
print(json.dumps(results))
"""


def test_w4_kernels_under_the_interpreter_match_float64():
    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=environment,
                          cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 4 * (1 + 2 * 2 + 2 * 2)
    failures = [case for case in results if not case[2] <= case[3]]
    assert not failures, failures
