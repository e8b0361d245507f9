"""Dequantize-then-cuBLAS for many rows in N slices: a candidate to the one-shot path of ``ops._w4_linear``
(``F.linear(x, w4_dequantize(W))``), measured by ``bench/prefill_parts.py``; not dispatched to yet.

``sliced_linear(x (M, K), codes, ..., slice_rows, streams)`` -> (M, N) in x's dtype: for each slice of
``slice_rows`` weight rows (output columns), ``w4_dequantize`` writes the slice's weight into one of ``streams``
scratch buffers (slice_rows, K), reused from slice to slice, and ``torch.mm`` writes ``x @ slice.T`` straight into
the output's columns of that slice (a strided view: cuBLAS's leading dimension, no copy). A slice small enough for
the L2 cache (50 MB on an H100) is written by the dequantization and read back by the GEMM without a round trip to
HBM, where the one-shot path writes and re-reads the whole (N, K) 16-bit weight. With ``streams=2`` the slice
i + 1 is dequantized on a side stream while the GEMM of slice i runs on the caller's stream (two buffers; events
order every write after the GEMM that last read the buffer).

Each output element is the same dot product as in the one-shot path (x's row and the same dequantized weight row,
bit for bit: ``w4_dequantize`` is exact); cuBLAS may pick another kernel (tiles, split-K) for a slice's shape, so
its float32 sums may round differently. The bias, if any, is added once at the end in x's dtype.
"""

from __future__ import annotations

import functools

import torch

from lowbit.kernels.w4_dequantize import w4_dequantize


@functools.cache
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device_index)


def sliced_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                  global_scale: torch.Tensor | None, bias: torch.Tensor | None, kind: str, group_size: int,
                  zero_offset: int, slice_rows: int, streams: int = 1) -> torch.Tensor:
    """``x @ dequantize(W).T + bias`` (arguments as ``ops.w4_linear``) in slices of ``slice_rows`` weight rows,
    dequantized into reused buffers, on one stream or (``streams=2``, CUDA) overlapped with the previous slice's
    GEMM; see the module docstring."""
    if streams not in (1, 2) or (streams == 2 and not x.is_cuda):
        raise ValueError(f"streams={streams!r}: expected 1, or 2 on CUDA")
    if slice_rows < 1:
        raise ValueError(f"slice_rows={slice_rows!r}: expected a positive int")
    n, k = codes.shape[0], codes.shape[1] * 2
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)
    rows = min(slice_rows, n)
    buffers = [torch.empty((rows, k), device=x.device, dtype=x.dtype) for _ in range(streams)]
    main = torch.cuda.current_stream(x.device) if streams == 2 else None
    side = _side_stream(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if streams == 2 else None
    if side is not None:
        side.wait_stream(main)  # x and the codes are ready; the graph capture forks here
    consumed = [None] * streams  # the event after the GEMM that last read each buffer
    for index, start in enumerate(range(0, n, rows)):
        stop = min(start + rows, n)
        buffer = buffers[index % streams][: stop - start]
        arguments = dict(kind=kind, group_size=group_size, dtype=x.dtype, global_scale=global_scale,
                         zero_point=None if zero_point is None else zero_point[start:stop],
                         zero_offset=zero_offset, out=buffer)
        if side is None:
            w4_dequantize(codes[start:stop], scale[start:stop], **arguments)
            torch.mm(x, buffer.t(), out=out[:, start:stop])
            continue
        with torch.cuda.stream(side):
            if consumed[index % 2] is not None:
                side.wait_event(consumed[index % 2])
            w4_dequantize(codes[start:stop], scale[start:stop], **arguments)
            ready = torch.cuda.Event()
            ready.record(side)
        main.wait_event(ready)
        torch.mm(x, buffer.t(), out=out[:, start:stop])
        consumed[index % 2] = torch.cuda.Event()
        consumed[index % 2].record(main)
    # the buffers were last written on the side stream before main waited on it: freeing them on main is safe
    return out if bias is None else out.add_(bias)
