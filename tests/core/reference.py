"""Float64 references for the core tests, written from the format definitions (ModelOpt, OCP MX v1.0).

Nothing here imports lowbit. Each fake-quant reference returns ``Reference(values, ambiguous, step)``:

- ``values``: the float64 fake-quantized tensor;
- ``ambiguous``: True where a float64 quotient lies within ``TIE_REL`` (relative) of a rounding tie,
  so float32 arithmetic may legitimately land on the other side;
- ``step``: the grid spacing at that element (what a flipped tie can change), float64.

``assert_matches`` then demands: unambiguous elements equal the reference within ``VALUE_REL``
(a few float32 ulps of the value), ambiguous ones within one ``step``, and few ambiguous elements.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

TIE_REL = 2.0**-21  # float32 scale and product carry <= 3 roundings (~2**-22.4 relative); 2x margin
VALUE_REL = 2.0**-21  # float32 dequantization: a product and a quotient, each <= 0.5 ulp
MAX_AMBIGUOUS_FRACTION = 0.01


@dataclass
class Reference:
    values: torch.Tensor
    ambiguous: torch.Tensor
    step: torch.Tensor


def random_with_outliers(shape: tuple[int, ...], generator: torch.Generator, outlier_scale: float = 20.0):
    """float32 normal data with ~2% outliers (x ``outlier_scale``), never all zeros."""
    x = torch.randn(shape, generator=generator)
    outliers = torch.rand(shape, generator=generator) < 0.02
    return torch.where(outliers, x * outlier_scale, x)


# ---- granularity: the amax (or amin) of the group each element belongs to, by explicit loops -------
def _groups(shape: tuple[int, ...], axis, block_sizes) -> list[tuple]:
    """Index tuples (of ints and slices) of the groups that share one scale."""
    ndim = len(shape)
    if block_sizes is not None:
        sizes = {a % ndim: (shape[a % ndim] if s is None else s) for a, s in block_sizes.items() if isinstance(a, int)}
        ranges = []
        for dim in range(ndim):
            if dim in sizes:
                ranges.append([slice(start, start + sizes[dim]) for start in range(0, shape[dim], sizes[dim])])
            else:
                ranges.append(range(shape[dim]))  # axes without a block size keep every index apart
        return list(itertools.product(*ranges))
    if axis is None:
        return [tuple(slice(None) for _ in shape)]
    kept = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    ranges = [range(shape[d]) if d in kept else [slice(None)] for d in range(ndim)]
    return list(itertools.product(*ranges))


def group_reduce(x: torch.Tensor, reduce: str, axis=None, block_sizes=None) -> torch.Tensor:
    """float64 tensor shaped like ``x``: each element gets ``max|x|`` / ``max x`` / ``min x`` of its group.

    ``reduce``: "absmax", "max" or "min". ``axis`` kept dims (per-channel) or ``block_sizes`` ({axis: size}).
    """
    x = x.double()
    out = torch.empty_like(x)
    for index in _groups(tuple(x.shape), axis, block_sizes):
        group = x[index]
        if reduce == "absmax":
            out[index] = group.abs().max()
        elif reduce == "max":
            out[index] = group.max()
        else:
            out[index] = group.min()
    return out


# ---- integers ------------------------------------------------------------------------------------
def _near_half(t: torch.Tensor) -> torch.Tensor:
    return (t - torch.floor(t) - 0.5).abs() <= TIE_REL * t.abs().clamp(min=1.0)


def int_reference(x: torch.Tensor, amax: torch.Tensor, num_bits: int, unsigned=False, narrow_range=False):
    """ModelOpt symmetric integer fake quant: scale = qmax / amax, round half even, clamp, divide back."""
    qmax = 2**num_bits - 1 if unsigned else 2 ** (num_bits - 1) - 1
    qmin = 0 if unsigned else (-qmax if narrow_range else -qmax - 1)
    amax = amax.double()
    scale = qmax / amax
    scaled = x.double() * scale
    codes = torch.clamp(torch.round(scaled), qmin, qmax)
    ambiguous = _near_half(scaled) & (scaled > qmin - 0.5) & (scaled < qmax + 0.5)
    return Reference(codes / scale, ambiguous, torch.broadcast_to(1 / scale, x.shape))


def int_asym_reference(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, num_bits: int):
    """Affine fake quant with the range widened to contain 0: step = (hi - lo) / (2**b - 1), zero point."""
    qmax = 2**num_bits - 1
    low = torch.clamp(xmin.double(), max=0.0)
    high = torch.clamp(xmax.double(), min=0.0)
    step = (high - low) / qmax
    zero_point_raw = -low / step
    zero_point = torch.clamp(torch.round(zero_point_raw), 0, qmax)
    scaled = x.double() / step
    codes = torch.clamp(torch.round(scaled) + zero_point, 0, qmax)
    ambiguous = _near_half(scaled) | _near_half(zero_point_raw)
    values = (codes - zero_point) * step
    return Reference(values, torch.broadcast_to(ambiguous, x.shape), torch.broadcast_to(step, x.shape))


# ---- small floats from their bit layout -------------------------------------------------------------
@dataclass(frozen=True)
class Minifloat:
    exponent_bits: int
    mantissa_bits: int
    nan_code_all_ones: bool  # E4M3 "fn": S.1111.111 is NaN; E5M2: exponent all ones is inf/NaN

    def positive_values(self) -> torch.Tensor:
        """Finite non-negative values in code order (code i has value [i]); ascending."""
        bias = 2 ** (self.exponent_bits - 1) - 1
        values = []
        for code in range(2 ** (self.exponent_bits + self.mantissa_bits)):
            exponent, mantissa = code >> self.mantissa_bits, code & (2**self.mantissa_bits - 1)
            all_ones_exponent = exponent == 2**self.exponent_bits - 1
            if self.exponent_bits == 5 and all_ones_exponent:
                break  # E5M2 inf / NaN
            if self.nan_code_all_ones and all_ones_exponent and mantissa == 2**self.mantissa_bits - 1:
                break  # E4M3 NaN
            if exponent == 0:
                values.append(2.0 ** (1 - bias) * mantissa / 2**self.mantissa_bits)
            else:
                values.append(2.0 ** (exponent - bias) * (1 + mantissa / 2**self.mantissa_bits))
        return torch.tensor(values, dtype=torch.float64)

    @property
    def max_value(self) -> float:
        return self.positive_values()[-1].item()


E4M3 = Minifloat(4, 3, True)
E5M2 = Minifloat(5, 2, False)
E2M1 = Minifloat(2, 1, False)
FORMATS = {(4, 3): E4M3, (5, 2): E5M2, (2, 1): E2M1}


def round_minifloat(t: torch.Tensor, fmt: Minifloat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nearest value ties-to-even-code and saturating, ambiguous mask, local step), all float64."""
    grid = fmt.positive_values()
    magnitude = torch.clamp(t.double().abs(), max=grid[-1].item())
    upper = torch.searchsorted(grid, magnitude).clamp(1, len(grid) - 1)
    lower = upper - 1
    low_value, high_value = grid[lower], grid[upper]
    to_low, to_high = magnitude - low_value, high_value - magnitude
    pick_high = (to_high < to_low) | ((to_high == to_low) & (upper % 2 == 0))
    rounded = torch.where(pick_high, high_value, low_value)
    midpoint = (low_value + high_value) / 2
    ambiguous = (magnitude - midpoint).abs() <= TIE_REL * midpoint
    return torch.copysign(rounded, t.double()), ambiguous, high_value - low_value


def fp_reference(x: torch.Tensor, amax: torch.Tensor, fmt: Minifloat) -> Reference:
    """Scaled minifloat fake quant: scale = max_value / amax; round(x * scale) / scale."""
    scale = fmt.max_value / amax.double()
    rounded, ambiguous, step = round_minifloat(x.double() * scale, fmt)
    return Reference(rounded / scale, ambiguous, step / scale)


def nvfp4_reference(x: torch.Tensor, global_amax: float, block_size: int = 16) -> Reference:
    """NVFP4 one block of the last axis at a time (ModelOpt): E4M3 block scale over an FP32 global scale.

    global = global_amax / (6 * 448); s = e4m3(block_amax / (6 * global)); x_hat = e2m1(x / (s * global)) * s * global.
    A block whose scale sits on an E4M3 tie is marked ambiguous as a whole, with a step of its largest value.
    """
    rows = x.double().reshape(-1, x.shape[-1])
    values, ambiguous, step = torch.empty_like(rows), torch.zeros_like(rows, dtype=torch.bool), torch.empty_like(rows)
    global_scale = global_amax / (6 * 448)
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], block_size):
            block = rows[r, start : start + block_size]
            raw_scale = torch.tensor(block.abs().max().item() / (6 * global_scale), dtype=torch.float64)
            block_scale, scale_tie, _ = round_minifloat(raw_scale, E4M3)
            divisor = block_scale.item() * global_scale
            elements, tie, element_step = round_minifloat(block / divisor, E2M1)
            values[r, start : start + block_size] = elements * divisor
            ambiguous[r, start : start + block_size] = tie | bool(scale_tie)
            step[r, start : start + block_size] = element_step * divisor
            if scale_tie:
                step[r, start : start + block_size] = block.abs().max()
    return Reference(values.reshape(x.shape), ambiguous.reshape(x.shape), step.reshape(x.shape))


def mx_reference(x: torch.Tensor, element: Minifloat, block_size: int = 32) -> Reference:
    """OCP MX one block of the last axis at a time: shared exponent floor(log2(block_amax)) - emax_elem.

    The scale is a power of two, so x / 2**e is exact: only element rounding ties can be ambiguous.
    """
    emax = math.floor(math.log2(element.max_value))
    rows = x.double().reshape(-1, x.shape[-1])
    values, ambiguous, step = torch.empty_like(rows), torch.zeros_like(rows, dtype=torch.bool), torch.empty_like(rows)
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], block_size):
            block = rows[r, start : start + block_size]
            shared = min(max(math.floor(math.log2(block.abs().max().item())) - emax, -127), 127)
            scale = 2.0**shared
            elements, tie, element_step = round_minifloat(block / scale, element)
            values[r, start : start + block_size] = elements * scale
            ambiguous[r, start : start + block_size] = tie
            step[r, start : start + block_size] = element_step * scale
    return Reference(values.reshape(x.shape), ambiguous.reshape(x.shape), step.reshape(x.shape))


# ---- comparison -----------------------------------------------------------------------------------
def assert_matches(actual: torch.Tensor, reference: Reference, max_ambiguous: float = MAX_AMBIGUOUS_FRACTION):
    """Unambiguous elements within VALUE_REL of the reference; ambiguous ones within one grid step."""
    actual = actual.detach().double()
    expected = reference.values
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    error = (actual - expected).abs()
    exact_ok = error <= VALUE_REL * expected.abs() + 1e-30
    tie_ok = error <= reference.step * (1 + 1e-6)
    bad = ~torch.where(reference.ambiguous, tie_ok, exact_ok)
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements differ; first at {bad.nonzero()[0].tolist()}: "
        f"actual {actual[bad][0].item()!r} expected {expected[bad][0].item()!r}"
    )
    fraction = reference.ambiguous.double().mean().item()
    assert fraction <= max_ambiguous, f"{fraction:.3%} of the elements are rounding ties: test data too regular"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm()).item()
