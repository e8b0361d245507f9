"""``w4_sliced.sliced_linear`` (dequantize N slices into reused buffers, cuBLAS into the output's column slices)
against float64 products of lowbit.formats' dequantized weights: on CUDA (one stream, two streams, in a CUDA
graph), and on the CPU under Triton's interpreter (one stream). ``w4_dequantize(out=...)`` writes the same bits
as a fresh tensor."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.kernels import dispatch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FORMATS = {
    "int4-g128": WeightFormat("int", 4, block_size=128),
    "asym-g64": WeightFormat("int_asym", 4, block_size=64),
    "nvfp4": WeightFormat("nvfp4", (2, 1), block_size=16),
}


def _operands(fmt: WeightFormat, n: int, k: int, device: str, generator: torch.Generator):
    """(packed weight, the arguments of sliced_linear after x and before bias and kind as a dict)."""
    w = torch.randn(n, k, generator=generator, device=device) * 0.05
    w = torch.where(torch.rand(n, k, generator=generator, device=device) < 0.01, w * 30, w).to(torch.bfloat16)
    packed = quantize_weight(w, fmt)
    arguments = dispatch.triton_arguments(packed)
    return packed, dict(zero_point=arguments.get("zero_point"), global_scale=arguments.get("global_scale"),
                        kind=arguments["kind"], group_size=arguments["group_size"],
                        zero_offset=arguments.get("zero_offset", 0))


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).norm() / reference.norm()).item()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("slice_rows", [64, 100, 4096])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sliced_linear_matches_float64_on_cuda(name, streams, slice_rows, with_bias):
    from lowbit.kernels.w4_sliced import sliced_linear

    generator = torch.Generator(device="cuda").manual_seed(0)
    n, k, m = 300, 512, 130  # N not a multiple of the slices: a short last slice
    packed, arguments = _operands(FORMATS[name], n, k, "cuda", generator)
    x = (torch.randn(m, k, generator=generator, device="cuda") * 2).to(torch.bfloat16)
    bias = torch.randn(n, generator=generator, device="cuda").to(torch.bfloat16) if with_bias else None
    reference = x.double() @ packed.dequantize(torch.float64).T
    out = sliced_linear(x, packed.codes, packed.scale, arguments["zero_point"], arguments["global_scale"], bias,
                        arguments["kind"], arguments["group_size"], arguments["zero_offset"], slice_rows, streams)
    torch.cuda.synchronize()
    if bias is not None:
        reference = reference.to(torch.bfloat16).double() + bias.double()  # the bias is added to the rounded product
    # the output's own rounding (twice with a bias): 3x the reference's distance to its bf16 rounding
    tolerance = 3 * _relative_error(reference.to(torch.bfloat16), reference) + 1e-5
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert _relative_error(out, reference) <= tolerance
    again = sliced_linear(x, packed.codes, packed.scale, arguments["zero_point"], arguments["global_scale"], bias,
                          arguments["kind"], arguments["group_size"], arguments["zero_offset"], slice_rows, streams)
    assert torch.equal(again, out)  # reused buffers and events leave nothing behind


@pytest.mark.gpu
@needs_cuda
def test_two_streams_in_a_cuda_graph_equal_eager():
    from lowbit.kernels.w4_sliced import sliced_linear

    generator = torch.Generator(device="cuda").manual_seed(1)
    packed, arguments = _operands(FORMATS["int4-g128"], 640, 1024, "cuda", generator)
    x = torch.randn(256, 1024, generator=generator, device="cuda").to(torch.bfloat16)

    def call():
        return sliced_linear(x, packed.codes, packed.scale, None, None, None, "int_divide", 128,
                             arguments["zero_offset"], 128, 2)

    eager = call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    for _ in range(3):
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_into_a_buffer_equals_a_fresh_tensor(name):
    kernels = dispatch.triton_w4()
    generator = torch.Generator(device="cuda").manual_seed(2)
    packed, arguments = _operands(FORMATS[name], 96, 256, "cuda", generator)
    kind_arguments = dispatch.triton_arguments(packed)
    fresh = kernels.w4_dequantize(packed.codes, packed.scale, dtype=torch.bfloat16, **kind_arguments)
    buffer = torch.full((96, 256), float("nan"), device="cuda", dtype=torch.bfloat16)
    written = kernels.w4_dequantize(packed.codes, packed.scale, dtype=torch.bfloat16, out=buffer, **kind_arguments)
    assert written is buffer and torch.equal(buffer, fresh)
    assert torch.equal(fresh, packed.dequantize(torch.bfloat16))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        kernels.w4_dequantize(packed.codes, packed.scale, dtype=torch.bfloat16, out=buffer[:, :128],
                              **kind_arguments)


SCRIPT = r"""
import json
import torch
from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.kernels import dispatch
from lowbit.kernels.w4_sliced import sliced_linear

FORMATS = {"int4-g128": WeightFormat("int", 4, block_size=128), "asym-g64": WeightFormat("int_asym", 4, block_size=64),
           "nvfp4": WeightFormat("nvfp4", (2, 1), block_size=16)}
generator = torch.Generator().manual_seed(3)
results = []
for name, fmt in FORMATS.items():
    n, k = 72, 256
    w = torch.randn(n, k, generator=generator) * 0.05
    w = torch.where(torch.rand(n, k, generator=generator) < 0.01, w * 30, w).to(torch.bfloat16)
    packed = quantize_weight(w, fmt)
    a = dispatch.triton_arguments(packed)
    x = torch.randn(5, k, generator=generator).to(torch.float32)  # float32: the interpreter's sums, unrounded
    reference = x.double() @ packed.dequantize(torch.float64).T
    for slice_rows in (16, 30, 100):
        out = sliced_linear(x, packed.codes, packed.scale, a.get("zero_point"), a.get("global_scale"), None,
                            a["kind"], a["group_size"], a.get("zero_offset", 0), slice_rows)
        error = ((out.double() - reference).norm() / reference.norm()).item()
        results.append((name, slice_rows, error))
messages = []
for streams, slice_rows in ((3, 16), (2, 16), (1, 0)):
    try:
        sliced_linear(x, packed.codes, packed.scale, None, a.get("global_scale"), None, a["kind"], 16, 0,
                      slice_rows, streams)
    except ValueError as error:
        messages.append(str(error))
print(json.dumps({"results": results, "messages": messages}))
"""


@needs_triton
def test_sliced_linear_under_the_interpreter_matches_float64():
    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=environment,
                          cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(answer["results"]) == 9
    failures = [case for case in answer["results"] if not case[2] < 1e-6]  # float32 sums of exact weights
    assert not failures, failures
    assert answer["messages"] == ["streams=3: expected 1, or 2 on CUDA", "streams=2: expected 1, or 2 on CUDA",
                                  "slice_rows=0: expected a positive int"]
