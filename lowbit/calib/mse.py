"""MSE calibrator: the amax on a grid around the max that minimises the fake-quant squared error.

Candidates are ``amax_max * m`` for ``m = linspace(start_multiplier, stop_multiplier, num_steps)``,
where ``amax_max`` is the running max of ``|x|`` over everything collected. The error of a candidate
is ``sum((quant_fn(x, candidate) - x)**2)`` (float64), per kept channel when ``reduce_dims`` is set.
The default grid (0.25 to 4 in 31 steps of 0.125) contains 1.0, so the result is never worse than
max calibration on the data the calibrator kept.

What is kept, so memory stays bounded:

- per-tensor (``reduce_dims`` None or naming every dim): the running max, plus a systematic sample of rows (the last dim
  is kept whole, so block structure survives) of at most ``sample_size`` elements. Every
  ``stride``-th row is kept; when the sample is full, every other kept row is dropped and the stride
  doubles, so the sample stays spread evenly over all batches, with no random numbers.
- per-channel / per-block: the amax shape is tied to the input, which is what weights need (collected
  once). Every collected tensor is kept (a copy) up to ``sample_size`` elements in total; more raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lowbit.calib.base import Calibrator, running_max

QuantFn = Callable[[Tensor, Tensor], Tensor]


class MseCalibrator(Calibrator):
    """Grid search of amax minimising ``mean((quant_fn(x, amax) - x)**2)`` over the collected data."""

    def __init__(
        self,
        quant_fn: QuantFn,
        reduce_dims: tuple[int, ...] | None = None,
        num_steps: int = 31,
        start_multiplier: float = 0.25,
        stop_multiplier: float = 4.0,
        sample_size: int = 2**22,
    ) -> None:
        if not callable(quant_fn):
            raise TypeError(f"quant_fn must be a callable (x, amax) -> fake-quantized x, got {quant_fn!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if not 0 < start_multiplier <= stop_multiplier:
            raise ValueError(
                "need 0 < start_multiplier <= stop_multiplier, got "
                f"start_multiplier={start_multiplier!r}, stop_multiplier={stop_multiplier!r}"
            )
        if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"sample_size must be a positive int, got {sample_size!r}")
        super().__init__(reduce_dims)
        self.quant_fn = quant_fn
        self.multipliers = torch.linspace(start_multiplier, stop_multiplier, num_steps, dtype=torch.float64)
        self.sample_size = sample_size
        self.reset()

    def reset(self) -> None:
        self._amax: Tensor | None = None
        self._per_tensor_shape: tuple[int, ...] | None = None  # set by the first collect when per-tensor
        self._kept: list[Tensor] = []
        self._kept_elements = 0
        self._rows = _SystematicRows(self.sample_size)

    def collect(self, x: Tensor) -> None:
        x = self._checked(x)
        if self._amax is None:
            self._per_tensor_shape = self.per_tensor_shape(x)
        if self._per_tensor_shape is not None:
            self._amax = running_max(self._amax, self._finite(x.abs().float().amax(), x), type(self).__name__)
            self._rows.add(x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1))
            return
        self._amax = running_max(self._amax, self._finite(self._abs_amax(x), x), type(self).__name__)
        if self._kept_elements + x.numel() > self.sample_size:
            raise ValueError(
                f"MseCalibrator with reduce_dims={self.reduce_dims} keeps its inputs and would exceed "
                f"sample_size={self.sample_size} elements; per-channel MSE is meant for weights "
                "(collected once): raise sample_size or use per-tensor MSE for activations"
            )
        self._kept.append(x.clone())
        self._kept_elements += x.numel()

    def compute_amax(self) -> Tensor | None:
        if self._amax is None:
            return None
        per_tensor = self._per_tensor_shape is not None
        batches = self._rows.rows() if per_tensor else self._kept
        candidates = [self._amax * m for m in self.multipliers.tolist()]
        errors = torch.stack([self._squared_error(batches, amax) for amax in candidates])
        best = errors.argmin(dim=0)  # first minimum: the smallest multiplier among ties
        amax = self._amax * self.multipliers.to(self._amax.device)[best].float()
        return amax.reshape(self._per_tensor_shape) if per_tensor else amax

    def _squared_error(self, batches: list[Tensor], amax: Tensor) -> Tensor:
        """Sum of squared fake-quant errors, float64, shaped like amax; NaN (e.g. amax 0) counts as inf."""
        total = torch.zeros(amax.shape, dtype=torch.float64, device=amax.device)
        for x in batches:
            error = (self.quant_fn(x, amax).double() - x.double()).square()
            per_amax = error.sum() if self._per_tensor_shape is not None else error.sum(self.reduce_dims, keepdim=True)
            total += per_amax
        return total.nan_to_num(nan=float("inf"))


class _SystematicRows:
    """Every ``stride``-th row of all rows added; at most ``capacity`` elements (stride doubles when full)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.stride = 1
        self.seen = 0  # rows offered so far
        self.chunks: list[tuple[int, Tensor]] = []  # (global index of the first kept row, kept rows)

    def add(self, rows: Tensor) -> None:
        first = -self.seen % self.stride  # first local row whose global index is a multiple of stride
        kept = rows[first :: self.stride]
        if kept.shape[0]:
            self.chunks.append((self.seen + first, kept.clone()))
        self.seen += rows.shape[0]
        while self._count(lambda c: c.numel()) > self.capacity and self._count(lambda c: c.shape[0]) > 1:
            self._thin()

    def _count(self, size: Callable[[Tensor], int]) -> int:
        return sum(size(chunk) for _, chunk in self.chunks)

    def _thin(self) -> None:
        """Keep only the rows whose global index is a multiple of ``2 * stride``."""
        self.stride *= 2
        thinned = []
        for start, chunk in self.chunks:
            offset = 0 if start % self.stride == 0 else 1
            if chunk[offset::2].shape[0]:
                thinned.append((start + offset * self.stride // 2, chunk[offset::2].clone()))
        self.chunks = thinned

    def rows(self) -> list[Tensor]:
        return [chunk for _, chunk in self.chunks]
