"""The CPU-checkable part of ``lowbit.kernels.eager_graphs``: which calls may replay a CUDA graph, and that
nothing changes where none applies (CPU layers, torch.compile). The replays themselves: test_eager_graphs_gpu.py."""

from __future__ import annotations

import copy
import importlib.util
import pickle

import torch

from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.kernels import PreparedLinear, dispatch, eager_graphs, prepare_linear


def _rows(rows: int, k: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows)
    return torch.randn(rows, k, generator=generator).to(torch.bfloat16)


def test_row_counts_up_to_the_limit_are_allowed():
    assert eager_graphs.MAX_ROWS == 4
    assert [eager_graphs.graph_allowed(_rows(m), None) for m in (1, 3, 4, 5, 16)] == [True, True, True, False, False]


def test_switching_off(monkeypatch):
    monkeypatch.setattr(eager_graphs, "ENABLED", False)
    assert not eager_graphs.graph_allowed(_rows(1), None)


def test_the_environment_variable_switches_off(monkeypatch):
    """The module read again with ``LOWBIT_EAGER_GRAPHS=0`` set (a separate copy: lowbit's own stays as it is)."""
    monkeypatch.setenv("LOWBIT_EAGER_GRAPHS", "0")
    spec = importlib.util.spec_from_file_location("eager_graphs_copy", eager_graphs.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.ENABLED is False and eager_graphs.ENABLED is True


def test_calls_needing_autograd_are_not_graphed():
    x = _rows(1).requires_grad_()
    bias = torch.zeros(8, dtype=torch.bfloat16, requires_grad=True)
    assert not eager_graphs.graph_allowed(x, None)
    assert not eager_graphs.graph_allowed(_rows(1), bias)
    with torch.no_grad():
        assert eager_graphs.graph_allowed(x, bias)
    with torch.inference_mode():
        assert eager_graphs.graph_allowed(_rows(2), bias)


def test_only_contiguous_aligned_rows_are_graphed():
    wide = _rows(2, k=128)
    assert not eager_graphs.graph_allowed(wide[:, :64], None)  # strided rows
    assert not eager_graphs.graph_allowed(wide.reshape(-1)[1:65].reshape(1, 64), None)  # 2 bytes past alignment
    assert eager_graphs.graph_allowed(wide.reshape(-1)[8:72].reshape(1, 64), None)  # 16 bytes past: aligned


def test_cpu_calls_never_take_a_graph():
    assert not eager_graphs.takes_graph(_rows(1), None)
    assert eager_graphs.for_device(torch.device("cpu")) is None


def test_cpu_prepared_layers_carry_no_graphs():
    fmt = WeightFormat("int", 4, block_size=32)
    packed = quantize_weight(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), fmt)
    assert prepare_linear(packed, torch.device("cpu"), torch.bfloat16).graphs is None


def test_copies_and_pickles_start_without_graphs():
    graphs = eager_graphs.EagerGraphs()
    graphs._calls[1] = object()  # stands for a captured call (bound to its tensors' addresses)
    assert copy.deepcopy(graphs).captured() == [] and pickle.loads(pickle.dumps(graphs)).captured() == []
    assert graphs.captured() == [1]


def _graphed_cpu_layer() -> tuple[PreparedLinear, torch.Tensor]:
    """A CPU PreparedLinear given graphs, as CUDA layers have: the gate must route its calls to the function."""
    fmt = WeightFormat("int", 8, per_channel=True)
    packed = quantize_weight(torch.randn(48, 128, generator=torch.Generator().manual_seed(2)), fmt)
    prepared = PreparedLinear(dispatch._dequantize_first, (packed,), torch.device("cpu"), torch.bfloat16, 48,
                              eager_graphs.EagerGraphs())
    return prepared, _rows(3, k=128).reshape(1, 3, 128)


def test_ungraphable_calls_run_the_function_unchanged():
    prepared, x = _graphed_cpu_layer()
    bias = torch.randn(48, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    expected = dispatch._dequantize_first(x.reshape(3, 128), prepared.operands[0], bias).reshape(1, 3, 48)
    assert torch.equal(prepared(x, bias), expected)
    assert prepared.graphs.captured() == []


def test_compiled_calls_trace_through_the_gate_without_a_graph_break():
    prepared, x = _graphed_cpu_layer()
    torch._dynamo.reset()
    compiled = torch.compile(lambda rows: prepared(rows, None), backend="eager", fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(compiled(x), prepared(x, None))
    assert prepared.graphs.captured() == []
