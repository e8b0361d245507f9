"""Eager few-row calls replayed from CUDA graphs (``lowbit.kernels.eager_graphs``), for every CUDA compressed format.

The reference is the same layer's ungraphed call (``eager_graphs.ENABLED`` off), whose accuracy against float64
the kernels' own tests check: a replay must equal it bit for bit, on fresh seeded inputs with outliers at every
call (a stale static input, or an output aliasing the static buffer, fails the comparison)."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compress import compress
from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.kernels import eager_graphs, prepare_linear
from tests.kernels.test_cpu import _weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (preset, activation dtype, bias, prepared function): every CUDA format whose eager call launches several kernels
CASES = {
    "int4_g128_fp16": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", torch.float16, False, "_cuda_w4"),
    "nvfp4_wo": ("W4A16_NVFP4_CFG", torch.bfloat16, False, "_cuda_w4"),
    "fp8_w8a8": ("FP8_DEFAULT_CFG", torch.bfloat16, False, "_fp8_rows"),
    "int8_wo": ("INT8_WEIGHT_ONLY_CFG", torch.bfloat16, False, "_cuda_int8"),
    "nvfp4_wo_bias": ("W4A16_NVFP4_CFG", torch.bfloat16, True, "_cuda_w4"),
    "fp8_w8a8_bias": ("FP8_DEFAULT_CFG", torch.bfloat16, True, "_fp8_rows"),
}
IN_FEATURES, OUT_FEATURES = 1024, 384  # 1-4 rows: SPLIT_K 2 in the fused kernel (shared workspace; two parts add
# in either order to the same bits, where more would make even ungraphed calls differ in their last bits)


def _activations(rows: int, dtype: torch.dtype, seed: int, k: int = IN_FEATURES) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, rows, k, generator=generator, device="cuda")
    outliers = torch.rand(1, rows, k, generator=generator, device="cuda") < 0.01
    return torch.where(outliers, x * 40, x).to(dtype)


def _layer(preset: str, dtype: torch.dtype, bias: bool) -> nn.Module:
    generator = torch.Generator().manual_seed(3)
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_weight(linear.weight.shape, seed=4))
        if bias:
            linear.bias.copy_(torch.randn(OUT_FEATURES, generator=generator))
    model = nn.Sequential(linear).to("cuda", dtype)
    calibration = _activations(8, dtype, seed=5)
    return compress(lowbit.quantize(model, copy.deepcopy(getattr(lowbit, preset)), lambda m: m(calibration)))[0]


def _ungraphed(layer: nn.Module, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(eager_graphs, "ENABLED", False)
        return layer(x)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_replays_equal_ungraphed_calls_bit_for_bit(case, rows, monkeypatch):
    preset, dtype, bias, function = CASES[case]
    layer = _layer(preset, dtype, bias)
    assert layer._prepared.function.__name__ == function and layer._prepared.graphs is not None
    outputs, expected = [], []
    with torch.inference_mode():
        for call in range(4):  # the first call captures, the others replay
            x = _activations(rows, dtype, seed=100 * rows + call)
            expected.append(_ungraphed(layer, x, monkeypatch))
            outputs.append(layer(x))
    assert layer._prepared.graphs.captured() == [rows]
    for out, reference in zip(outputs, expected, strict=True):  # compared after all calls: no output was overwritten
        assert out.shape == (1, rows, OUT_FEATURES) and out.dtype == dtype
        assert torch.equal(out, reference)
    assert len({out.data_ptr() for out in outputs}) == len(outputs)
    assert not torch.equal(outputs[-1], outputs[-2])


@pytest.mark.parametrize("case", ["nvfp4_wo", "int8_wo"])
def test_no_grad_takes_graphs_and_gradients_do_not(case, monkeypatch):
    preset, dtype, bias, _ = CASES[case]
    layer = _layer(preset, dtype, bias)
    x = _activations(2, dtype, seed=7)
    with torch.no_grad():
        out = layer(x)
    assert layer._prepared.graphs.captured() == [2]
    assert torch.equal(out, _ungraphed(layer, x, monkeypatch)) and not out.is_inference()
    x_grad = _activations(1, dtype, seed=8).requires_grad_()
    out = layer(x_grad)  # autograd: the packed-weight Function, no graph
    assert out.grad_fn is not None and layer._prepared.graphs.captured() == [2]


def test_a_bias_needing_gradients_is_not_graphed_and_a_new_bias_recaptures(monkeypatch):
    preset, dtype, _, _ = CASES["nvfp4_wo_bias"]
    layer = _layer(preset, dtype, bias=True)
    x = _activations(1, dtype, seed=9)
    layer(x)  # grad mode on and the bias a Parameter: the prepared call runs as before, ungraphed
    assert layer._prepared.graphs.captured() == []
    with torch.inference_mode():
        before = layer(x)
    assert layer._prepared.graphs.captured() == [1]
    with torch.no_grad():
        layer.bias = nn.Parameter(layer.bias * 3)  # another address: the graph must not read the old one
    with torch.inference_mode():
        after = layer(x)
        assert torch.equal(after, _ungraphed(layer, x, monkeypatch)) and not torch.equal(after, before)


def test_int4_bf16_is_torchs_single_op_and_not_graphed():
    layer = _layer("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", torch.bfloat16, False)
    assert layer._prepared.function.__name__ == "_cuda_int4" and layer._prepared.graphs is None


def test_a_users_capture_records_the_launches_instead(monkeypatch):
    """Under a capture of the caller's own (as CUDA-graph trees of a compiled model), the layer launches its
    kernels into that capture; replaying the caller's graph gives the ungraphed output."""
    preset, dtype, bias, _ = CASES["fp8_w8a8"]
    layer = _layer(preset, dtype, bias)
    static_x = _activations(1, dtype, seed=10)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _ungraphed(layer, static_x, monkeypatch)  # the user's warm-up (ungraphed: nothing of ours captured)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            static_out = layer(static_x)
        assert layer._prepared.graphs.captured() == []
        x = _activations(1, dtype, seed=11)
        static_x.copy_(x)
        graph.replay()
        assert torch.equal(static_out, _ungraphed(layer, x, monkeypatch))


def test_a_graph_keeps_its_split_k_workspace_when_a_larger_call_outgrows_it(monkeypatch):
    """The Triton kernels' split-K scratch is shared and grows with M x N: a graph captured with the smaller buffer
    must still find it alive and zeroed (``w4_shared.scratch`` keeps outgrown buffers). Were it freed, the junk
    allocated on the capture stream below would take its block and the replay's sums would read NaN."""
    from lowbit.kernels import w4_shared

    monkeypatch.setattr(w4_shared, "_BUFFERS", {})  # fresh scratch: this test's calls decide its sizes
    preset, dtype, bias, _ = CASES["nvfp4_wo"]
    layer = _layer(preset, dtype, bias)
    key = (torch.device("cuda", torch.cuda.current_device()), "partials")
    with torch.inference_mode():
        layer(_activations(1, dtype, seed=12))  # warm-up and capture: the workspace made on the capture stream
        captured_with = w4_shared._BUFFERS[key]
        layer(_activations(16, dtype, seed=13))  # 16 rows: ungraphed, SPLIT_K 2, a larger workspace
        assert w4_shared._BUFFERS[key] is not captured_with
        assert any(buffer is captured_with for buffer in w4_shared._REPLACED)
        with torch.cuda.stream(eager_graphs._capture_stream(torch.cuda.current_device())):
            junk = [torch.full((captured_with.numel(),), float("nan"), device="cuda") for _ in range(8)]
        torch.cuda.synchronize()
        x = _activations(1, dtype, seed=14)
        out = layer(x)
        assert torch.equal(out, _ungraphed(layer, x, monkeypatch)) and not out.isnan().any()
    del junk


def test_one_row_gemv_shape_replays_bit_for_bit(monkeypatch):
    """A weight shape where one row takes ``w4_gemv`` (activation permutation + GEMV: two launches)."""
    from lowbit.kernels import triton_w4

    n, k = 33792, 4096
    assert triton_w4.prefers_gemv(n, k)
    packed = quantize_weight(_weight((n, k), seed=15).cuda(), WeightFormat("nvfp4", (2, 1), block_size=16))
    prepared = prepare_linear(packed, torch.device("cuda"), torch.bfloat16)
    with torch.inference_mode():
        for call in range(3):
            x = _activations(1, torch.bfloat16, seed=16 + call, k=k)
            with monkeypatch.context() as patch:
                patch.setattr(eager_graphs, "ENABLED", False)
                expected = prepared(x, None)
            assert torch.equal(prepared(x, None), expected)
    assert prepared.graphs.captured() == [1]


def test_graphs_go_with_their_prepared_call_and_later_captures_work(monkeypatch):
    """Re-preparing drops a layer's graphs; once every graph is gone (the shared pool unused), new captures take a
    new pool and still replay the ungraphed output."""
    preset, dtype, bias, _ = CASES["int8_wo"]
    layer = _layer(preset, dtype, bias)
    x = _activations(1, dtype, seed=20)
    with torch.inference_mode():
        first = layer(x)
        layer.prepare(dtype)
        assert layer._prepared.graphs.captured() == []
        del layer
        gc.collect()
        other = _layer(preset, dtype, bias)
        assert torch.equal(other(x), first) and other._prepared.graphs.captured() == [1]
        assert torch.equal(other(x), _ungraphed(other, x, monkeypatch))
