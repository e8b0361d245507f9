"""Float64 references for the weight-compression tests, written from the definitions (NNCF's docs,
OCP MX v1.0, QLoRA's NF4 table), independent of lowbit's code."""

from __future__ import annotations

import torch
from torch import nn

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


def weight_with_outliers(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian weights (std 0.05) with 1% of entries 10x larger, float32."""
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    outliers = torch.rand(out_features, in_features, generator=generator) < 0.01
    return torch.where(outliers, weight * 10, weight)


def groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, in / g, g) float64; g = -1 is one group per row."""
    w = w.double()
    size = w.shape[1] if group_size == -1 else group_size
    return w.reshape(w.shape[0], -1, size)


def int_asym(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """NNCF's asymmetric integer: scale = (max - min) / (2^b - 1), zp = -round(min / scale)."""
    g = groups(w, group_size)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (high - low) / (2**bits - 1)
    zero_point = torch.clamp(-torch.round(low / scale), 0, 2**bits - 1)
    codes = torch.clamp(torch.round(g / scale) + zero_point, 0, 2**bits - 1)
    return ((codes - zero_point) * scale).reshape(w.shape)


def int_sym(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Symmetric integer with NNCF's signed scale (``_calculate_signed_scale``): per group
    ``step = |min| / 2^(b-1)`` if ``|min| >= max`` else ``-max / 2^(b-1)``, codes
    ``clamp(round(w / step), -2^(b-1), 2^(b-1) - 1)``: the larger-magnitude end maps exactly onto -2^(b-1)."""
    return int_sym_scaled(w, bits, group_size, 1.0)


def int_sym_scaled(w: torch.Tensor, bits: int, group_size: int, m: float) -> torch.Tensor:
    """:func:`int_sym` with the step multiplied by ``m``."""
    g = groups(w, group_size)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = torch.where(-low >= high, -low, -high) / 2 ** (bits - 1) * m
    return (torch.clamp(torch.round(g / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step).reshape(w.shape)


def int_sym_searched(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """:func:`int_sym` with, per group, the step ``m * step`` for the m in {0.5, 0.5 + 1/32, ..., 1} with the
    least largest absolute error (first on ties)."""
    g = groups(w, group_size)
    return least_error_per_group(g, lambda m: int_sym_scaled(w, bits, group_size, m).reshape(g.shape),
                                 lambda delta: delta.abs().amax(-1, keepdim=True)).reshape(w.shape)


def least_error_per_group(g: torch.Tensor, candidate, error_of=None) -> torch.Tensor:
    """Per group (last dim of ``g``), the ``candidate(m)`` with the least error to ``g`` (``error_of(delta)``,
    default the squared error) over m in {0.5, 0.5 + 1/32, ..., 1}; the first (smallest m) on ties."""
    best, best_error = None, None
    for k in range(17):
        values = candidate(0.5 + k / 32)
        delta = values - g
        error = delta.square().sum(-1, keepdim=True) if error_of is None else error_of(delta)
        if best is None:
            best, best_error = values, error
        else:
            better = error < best_error
            best = torch.where(better, values, best)
            best_error = torch.where(better, error, best_error)
    return best


def nearest(values: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    """Each value rounded to the nearest of +-magnitudes; a tie goes to the magnitude of even index
    (in a float format's ascending magnitude list that is the even mantissa)."""
    table = torch.tensor(magnitudes, dtype=torch.float64)
    distance = (values.double().abs().unsqueeze(-1) - table).abs()
    tied = distance == distance.min(-1, keepdim=True).values
    even = torch.arange(len(magnitudes)) % 2 == 0
    index = torch.where((tied & even).any(-1), (tied & even).double().argmax(-1), tied.double().argmax(-1))
    return torch.copysign(table[index], values.double())


def float_grid(exponent_bits: int, mantissa_bits: int, max_value: float) -> list[float]:
    """Every magnitude of a sign + E + M float up to max_value (subnormals included), ascending, from the
    bit layout: index e * 2^M + m."""
    bias = 2 ** (exponent_bits - 1) - 1
    magnitudes = []
    for e in range(2**exponent_bits):
        for m in range(2**mantissa_bits):
            if e == 0:
                value = 2.0 ** (1 - bias) * m / 2**mantissa_bits
            else:
                value = 2.0 ** (e - bias) * (1 + m / 2**mantissa_bits)
            if value <= max_value:
                magnitudes.append(value)
    return magnitudes


def scaled_float(w: torch.Tensor, group_size: int, grid: list[float]) -> torch.Tensor:
    """Float format with one scale per group: x_hat = nearest(w * max_grid / amax) * amax / max_grid."""
    g = groups(w, group_size)
    top = max(grid)
    scale = g.abs().amax(-1, keepdim=True) / top
    return (nearest(torch.clamp(g / scale, -top, top), grid) * scale).reshape(w.shape)


def mxfp4(w: torch.Tensor) -> torch.Tensor:
    """OCP MX: blocks of 32, scale 2^(floor(log2 amax) - 2), E2M1 elements (saturating at 6)."""
    g = groups(w, 32)
    scale = 2.0 ** (torch.floor(torch.log2(g.abs().amax(-1, keepdim=True))) - 2)
    grid = float_grid(2, 1, 6.0)
    return (nearest(torch.clamp(g / scale, -6, 6), grid) * scale).reshape(w.shape)


def nf4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """NF4: nearest table value of w / max|w| (per group), times max|w|."""
    g = groups(w, group_size)
    amax = g.abs().amax(-1, keepdim=True)
    table = torch.tensor(NF4, dtype=torch.float64)
    index = ((g / amax).unsqueeze(-1) - table).abs().argmin(-1)
    return (table[index] * amax).reshape(w.shape)


def linear_stack(sizes: list[int], generator: torch.Generator, bias: bool = False) -> nn.Sequential:
    """Linear(sizes[0] -> sizes[1]), ReLU, Linear(sizes[1] -> sizes[2]), ... with outlier weights."""
    layers: list[nn.Module] = []
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = nn.Linear(n_in, n_out, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(weight_with_outliers(n_out, n_in, generator) * (1 + index))
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def int_asym_searched(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric integer whose range per group is m * [min, max] for the m in {0.5, 0.5 + 1/32, ..., 1} with the
    least squared error (first on ties); the range is widened to contain 0 before quantizing (as the
    min/max of a group spanning zero already does)."""
    g = groups(w, group_size)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)

    def candidate(m: float) -> torch.Tensor:
        lo, hi = torch.clamp(low * m, max=0), torch.clamp(high * m, min=0)
        scale = (hi - lo) / (2**bits - 1)
        zero_point = torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1)
        codes = torch.clamp(torch.round(g / scale) + zero_point, 0, 2**bits - 1)
        return (codes - zero_point) * scale

    return least_error_per_group(g, candidate).reshape(w.shape)
