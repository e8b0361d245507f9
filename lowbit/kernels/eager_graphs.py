"""Eager few-row calls of a prepared CUDA layer replayed from a CUDA graph: one ``cudaGraphLaunch`` instead of one
Python launch per kernel.

Why: batch-1 eager decoding is bound by host time, and a Triton launch costs 50-100 us of it in Triton's Python
launcher (bench/results/e2e_cuda_2026-12-07b.md: NVFP4 weight-only 128 us a call, FP8 W8A8 93-120 us, INT8
weight-only 64 us, against 20-35 us for ``nn.Linear``). A replay costs the host one ``copy_``, one launch and one
``clone``, whatever the call launches.

Per ``PreparedLinear`` (``EagerGraphs``, attached by ``prepare_linear`` / ``CompressedLinear.prepare``) and per row
count M: the first eager call of M rows warms the call up on a side stream (``WARMUP_CALLS`` times: Triton
compilation, cuBLAS handles, the kernels' scratch buffers), then captures ``function(static_in, *operands,
bias=bias)`` into a ``torch.cuda.CUDAGraph``. Every call then runs ``static_in.copy_(rows)``, ``replay()`` and
returns ``static_out.clone()`` (a new tensor: callers keep outputs across calls). All graphs of a device allocate
from one shared memory pool (``torch.cuda.graph_pool_handle``, ``_live_call``): each keeps only its ``static_out`` alive
there, its intermediates are dead once a replay ends, so graphs replayed one after the other on a stream may reuse
each other's intermediate memory.

When a call takes a graph (``takes_graph``): ``ENABLED``; not under ``torch.compile`` tracing; M <= ``MAX_ROWS``;
x on CUDA, on the current device, contiguous after the reshape to (M, K), 16-byte aligned; no autograd (grad mode
off, or neither x nor the bias requires grad); no CUDA-graph capture underway on the current stream (HF's static
cache under CUDA-graph trees, a user's own ``torch.cuda.graph``: the launches are then captured there, as before).
Every other call runs ``function`` directly, unchanged.

Invariants: a replay runs the very kernels the ungraphed call launches on an input of the same shape, dtype,
contiguity and alignment (the gate's conditions: torch and Triton choose kernels by these), so its output equals
the ungraphed call's bit for bit (where that call is deterministic: the Triton kernels' split-K sums of more than
two parts add in arrival order, graphed or not). What a graph fixes at capture: the operands' and the bias'
addresses (the ``PreparedLinear`` holds its operands; a graph keeps its bias' storage and recaptures when the bias
passed has another address), the kernel choices, and global math settings (e.g. ``torch.backends.cuda.matmul``).
Graphs belong to their ``PreparedLinear``: ``CompressedLinear.prepare`` (also run after a move to another device)
drops them. In place changes of the operands' values show in replays as in ungraphed calls. Replays run on the
caller's current stream; calls of graphed layers from two streams at once are not supported (they share the pool,
and a layer its static input).

Turning it off: ``LOWBIT_EAGER_GRAPHS=0`` in the environment (read at import) or ``eager_graphs.ENABLED = False``.

Not graphed: torch's CUDA INT4 path at <= 4 rows (``kernels.cuda_int4``) is one aten op; a replay would add a copy
and a clone to it.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable

import torch

from lowbit.kernels.grad_mode import needs_autograd

ENABLED = os.environ.get("LOWBIT_EAGER_GRAPHS", "1") != "0"
MAX_ROWS = 4  # decode steps of up to 4 sequences; more rows are prefill, where launches are a small share
WARMUP_CALLS = 3  # as torch's CUDA-graph docs do before a capture
ALIGNMENT = 16  # bytes: Triton specialises pointers on it, cuBLAS chooses kernels by it


def takes_graph(rows: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether this call of (M, K) ``rows`` replays a graph (the conditions of the module docstring)."""
    if torch.compiler.is_compiling() or not rows.is_cuda or not graph_allowed(rows, bias):
        return False
    return rows.get_device() == torch.cuda.current_device() and not torch.cuda.is_current_stream_capturing()


def graph_allowed(rows: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """``takes_graph``'s conditions that hold on any device: ``ENABLED``, at most ``MAX_ROWS`` rows, no autograd,
    contiguous and ``ALIGNMENT``-aligned rows."""
    if not ENABLED or rows.shape[0] > MAX_ROWS:
        return False
    if needs_autograd(rows, bias):
        return False
    return rows.is_contiguous() and rows.data_ptr() % ALIGNMENT == 0


class _CapturedCall:
    """One graph: ``function(static_in, *operands, bias=bias)`` for inputs of ``static_in``'s shape and dtype."""

    def __init__(self, function: Callable[..., torch.Tensor], operands: tuple, rows: torch.Tensor,
                 bias: torch.Tensor | None):
        device = rows.get_device()
        # normal (not inference) tensors: the static input is written in place by calls in and out of inference mode
        with torch.inference_mode(False), torch.no_grad():
            self.static_in = torch.empty_like(rows, memory_format=torch.contiguous_format).copy_(rows)
            self.bias = None if bias is None else bias.detach()  # keeps the address the graph reads alive
            stream = _capture_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_CALLS):
                    function(self.static_in, *operands, bias=bias)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            sharer = _live_call(device)  # held through the capture: its pool stays in use
            pool = sharer.graph.pool() if sharer is not None else torch.cuda.graph_pool_handle()
            try:
                # thread_local, as torch.compile's CUDA-graph trees: other threads' CUDA calls do not void it
                with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    self.static_out = function(self.static_in, *operands, bias=bias)
            except RuntimeError as error:
                name = getattr(function, "__name__", function)
                raise RuntimeError(f"lowbit: capturing {name} for {tuple(rows.shape)} rows into a CUDA graph failed; "
                                   f"LOWBIT_EAGER_GRAPHS=0 runs eager calls ungraphed") from error
        _LIVE_CALLS.setdefault(device, weakref.WeakSet()).add(self)

    def serves(self, bias: torch.Tensor | None) -> bool:
        if bias is None or self.bias is None:
            return bias is None and self.bias is None
        return bias.data_ptr() == self.bias.data_ptr() and bias.dtype == self.bias.dtype

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(rows)
        self.graph.replay()
        return self.static_out.clone()


class EagerGraphs:
    """The graphs of one ``PreparedLinear``'s eager calls, by row count (module docstring). Copies and pickles
    start empty: a graph is bound to its tensors' addresses."""

    def __init__(self):
        self._calls: dict[int, _CapturedCall] = {}

    def __reduce__(self):
        return EagerGraphs, ()

    def captured(self) -> list[int]:
        """The row counts with a graph."""
        return sorted(self._calls)

    def run(self, function: Callable[..., torch.Tensor], operands: tuple, rows: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        """``function(rows, *operands, bias=bias)`` from this row count's graph, captured on first use (or when the
        bias moved); for calls ``takes_graph`` accepts."""
        call = self._calls.get(rows.shape[0])
        if call is None or not call.serves(bias):
            call = _CapturedCall(function, operands, rows, bias)
            self._calls[rows.shape[0]] = call
        return call(rows)


def for_device(device: torch.device) -> EagerGraphs | None:
    """Graphs for a prepared call on ``device``: CUDA only."""
    return EagerGraphs() if device.type == "cuda" else None


_LIVE_CALLS: dict[int, weakref.WeakSet] = {}  # per device: the captured calls still alive


def _live_call(device_index: int) -> _CapturedCall | None:
    """A live captured call of the device, whose graph's pool the next capture shares (torch's allocator refuses
    to share a pool whose graphs are all gone while its memory is not yet returned: a new pool is taken then)."""
    return next(iter(_LIVE_CALLS.get(device_index, ())), None)


@functools.cache
def _capture_stream(device_index: int) -> torch.cuda.Stream:
    """The side stream of a device's warm-ups and captures (one stream per pool, as torch's docs ask)."""
    return torch.cuda.Stream(device_index)
