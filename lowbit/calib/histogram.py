"""Histogram calibrators: percentile and entropy (TensorRT KL) amax from a histogram of ``|x|``.

The histogram has a fixed number of bins over ``[0, range]``; bin ``k`` counts ``|x|`` in
``[k*w, (k+1)*w)`` with ``w = range / num_bins`` (the last bin also holds ``|x| == range``).
``range`` is the first batch's max; when a larger value arrives the range is doubled as often as
needed and adjacent bin pairs are merged, which is exact, so memory stays ``num_bins`` counts
however much data is collected. The price: the bin width can be up to twice ``max|x| / num_bins``.
Per-tensor only: ``reduce_dims`` None or naming every dim of the input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lowbit.calib.base import Calibrator

ENTROPY_FIRST_BIN = 128  # smallest candidate threshold, in bins (TensorRT, ModelOpt)


class HistogramCalibrator(Calibrator):
    """Collects an int64 histogram of ``|x|`` (``num_bins`` bins, a power of two); subclasses read it."""

    def __init__(self, reduce_dims: tuple[int, ...] | None = None, num_bins: int = 2048) -> None:
        if not isinstance(num_bins, int) or num_bins < ENTROPY_FIRST_BIN or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= {ENTROPY_FIRST_BIN}, got {num_bins!r}")
        super().__init__(reduce_dims)
        self.num_bins = num_bins
        self.reset()

    def reset(self) -> None:
        self.hist: Tensor | None = None  # int64 counts, shape (num_bins,)
        self.range = 0.0
        self.amax_shape: tuple[int, ...] = ()

    @property
    def bin_width(self) -> float:
        return self.range / self.num_bins

    def collect(self, x: Tensor) -> None:
        x = self._checked(x)
        amax_shape = self.per_tensor_shape(x)
        if amax_shape is None:
            raise ValueError(
                f"{type(self).__name__} is per-tensor only, got reduce_dims={self.reduce_dims} for an input of "
                f"shape {tuple(x.shape)}; use 'max' or 'mse' for per-channel or per-block amax"
            )
        self.amax_shape = amax_shape
        magnitude = x.abs().float().flatten()
        if magnitude.numel() == 0:
            return
        batch_max = float(self._finite(magnitude.max(), x))
        if self.hist is None:
            self.hist = torch.zeros(self.num_bins, dtype=torch.int64, device=magnitude.device)
            self.range = max(batch_max, torch.finfo(torch.float32).tiny)
        if batch_max > self.range:
            self._grow_range(batch_max)
        bin_index = (magnitude * (self.num_bins / self.range)).floor_().long().clamp_(max=self.num_bins - 1)
        self.hist += torch.bincount(bin_index, minlength=self.num_bins)

    def _grow_range(self, new_max: float) -> None:
        """Double the range until it covers ``new_max``, merging bins in groups of ``2**doublings``."""
        doublings = max(1, math.ceil(math.log2(new_max / self.range)))
        while self.range * 2.0**doublings < new_max:
            doublings += 1
        self.hist = merge_bins(self.hist, 2**doublings)
        self.range *= 2.0**doublings

    def _amax_tensor(self, value: float) -> Tensor:
        return torch.tensor(value, dtype=torch.float32, device=self.hist.device).reshape(self.amax_shape)


class PercentileCalibrator(HistogramCalibrator):
    """amax = the ``percentile``-th percentile of ``|x|``, read from the histogram."""

    def __init__(
        self, reduce_dims: tuple[int, ...] | None = None, percentile: float = 99.99, num_bins: int = 2048
    ) -> None:
        if not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        super().__init__(reduce_dims, num_bins)
        self.percentile = float(percentile)

    def compute_amax(self) -> Tensor | None:
        if self.hist is None:
            return None
        return self._amax_tensor(percentile_from_histogram(self.hist, self.bin_width, self.percentile))


class EntropyCalibrator(HistogramCalibrator):
    """amax = the threshold minimising KL(reference || quantized) of the histogram (TensorRT method)."""

    def __init__(
        self,
        reduce_dims: tuple[int, ...] | None = None,
        num_bits: int = 8,
        unsigned: bool = False,
        num_bins: int = 2048,
    ) -> None:
        if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 2 <= num_bits <= 8:
            raise ValueError(f"entropy calibration needs an integer num_bits in [2, 8], got {num_bits!r}")
        super().__init__(reduce_dims, num_bins)
        self.num_levels = 2 ** (num_bits - 1 + int(unsigned))

    def compute_amax(self) -> Tensor | None:
        if self.hist is None:
            return None
        return self._amax_tensor(entropy_threshold_bin(self.hist, self.num_levels) * self.bin_width)


def merge_bins(hist: Tensor, factor: int) -> Tensor:
    """Histogram over a ``factor`` times wider range: bins ``[k*factor, (k+1)*factor)`` summed into bin k.

    ``factor`` is a power of two; the upper part of the result is zero. Same length as ``hist``.
    """
    merged = torch.zeros_like(hist)
    if factor >= hist.numel():
        merged[0] = hist.sum()
    else:
        merged[: hist.numel() // factor] = hist.view(-1, factor).sum(dim=1)
    return merged


def percentile_from_histogram(hist: Tensor, bin_width: float, percentile: float) -> float:
    """The value below which ``percentile`` % of the counts lie, interpolated linearly inside its bin.

    With ``target = percentile/100 * total`` and ``k`` the first bin whose cumulative count reaches it,
    ``amax = (k + (target - cumulative_before_k) / hist[k]) * bin_width``: within one bin width of the
    exact sample percentile.
    """
    counts = hist.double().cpu()
    cumulative = counts.cumsum(0)
    target = percentile / 100.0 * float(cumulative[-1])
    k = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)))
    k = min(k, counts.numel() - 1)
    before = float(cumulative[k - 1]) if k > 0 else 0.0
    fraction = (target - before) / float(counts[k]) if counts[k] > 0 else 0.0
    return (k + fraction) * bin_width


def kl_divergence_at_threshold(hist: np.ndarray, threshold_bin: int, num_levels: int) -> float:
    """KL(p || q) for clipping the histogram after ``threshold_bin`` bins and quantizing to ``num_levels``.

    p: ``hist[:i]`` with the clipped counts ``sum(hist[i:])`` added to its last bin.
    q: ``hist[:i]`` merged into ``num_levels`` equal groups of bins (bin j -> level ``j*num_levels // i``),
    each level's count spread evenly over its nonzero bins (zero bins stay zero).
    Both normalised; ``sum p log(p/q)`` over ``p > 0`` (inf where q = 0 < p). float64.
    """
    i = threshold_bin
    kept = hist[:i].astype(np.float64)
    reference = kept.copy()
    reference[-1] += hist[i:].sum()
    level = np.arange(i) * num_levels // i
    nonzero = kept > 0
    level_count = np.bincount(level, weights=kept, minlength=num_levels)
    level_nonzero_bins = np.bincount(level[nonzero], minlength=num_levels)
    candidate = np.zeros(i)
    candidate[nonzero] = level_count[level[nonzero]] / level_nonzero_bins[level[nonzero]]
    if candidate.sum() == 0:
        return math.inf
    p = reference / reference.sum()
    q = candidate / candidate.sum()
    support = p > 0
    if np.any(q[support] == 0):
        return math.inf
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def entropy_threshold_bin(hist: Tensor, num_levels: int) -> int:
    """The bin count ``i`` (amax = ``i * bin_width``) minimising the KL of :func:`kl_divergence_at_threshold`.

    Candidates ``i = max(128, num_levels) .. len(hist)``; ties go to the larger ``i``. As in TensorRT,
    bin 0 is replaced by bin 1 first, so exact zeros (ReLU, padding) do not dominate the divergence.
    """
    counts = hist.cpu().numpy().astype(np.float64)
    counts[0] = counts[1]
    if counts.sum() == 0:
        return counts.size
    first = max(ENTROPY_FIRST_BIN, num_levels)
    candidates = range(first, counts.size + 1)
    divergences = np.array([kl_divergence_at_threshold(counts, i, num_levels) for i in candidates])
    return first + int(len(divergences) - 1 - np.argmin(divergences[::-1]))
