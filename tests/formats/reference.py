"""Float64 references for the format tests, written from the definitions (not from lowbit's code)."""

from __future__ import annotations

import math

import torch

NAN = float("nan")


def minifloat_table(exponent_bits: int, mantissa_bits: int, special: str) -> list[float]:
    """Value of every code of a sign/exponent/mantissa format, decoded from the bit layout.

    ``special``: "fn" (all-ones exponent and mantissa is NaN, no inf: OCP E4M3), "ieee" (all-ones
    exponent is inf when the mantissa is 0, else NaN: E5M2), "none" (all finite: E2M1).
    """
    bias = 2 ** (exponent_bits - 1) - 1
    exponent_ones = 2**exponent_bits - 1
    mantissa_ones = 2**mantissa_bits - 1
    values = []
    for code in range(2 ** (1 + exponent_bits + mantissa_bits)):
        sign = -1.0 if code >> (exponent_bits + mantissa_bits) else 1.0
        exponent = (code >> mantissa_bits) & exponent_ones
        mantissa = code & mantissa_ones
        if special == "fn" and exponent == exponent_ones and mantissa == mantissa_ones:
            values.append(NAN)
        elif special == "ieee" and exponent == exponent_ones:
            values.append(sign * math.inf if mantissa == 0 else NAN)
        elif exponent == 0:
            values.append(sign * 2.0 ** (1 - bias) * mantissa / 2**mantissa_bits)
        else:
            values.append(sign * 2.0 ** (exponent - bias) * (1 + mantissa / 2**mantissa_bits))
    return values


E4M3_TABLE = minifloat_table(4, 3, "fn")
E5M2_TABLE = minifloat_table(5, 2, "ieee")
E2M1_TABLE = minifloat_table(2, 1, "none")


def positive_grid(table: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, codes) of the finite non-negative codes with sign bit 0, ascending, float64/int64."""
    half = len(table) // 2
    pairs = [(v, c) for c, v in enumerate(table[:half]) if math.isfinite(v)]
    return (
        torch.tensor([v for v, _ in pairs], dtype=torch.float64),
        torch.tensor([c for _, c in pairs], dtype=torch.int64),
    )


def midpoints(table: list[float]) -> torch.Tensor:
    """Midpoints between adjacent non-negative finite values of ``table`` (float64)."""
    values, _ = positive_grid(table)
    return (values[1:] + values[:-1]) / 2


def nearest_in_table(x: torch.Tensor, table: list[float]) -> torch.Tensor:
    """Nearest finite value of ``table`` to each ``x`` (float64), ties to the even code, saturating.

    |x| beyond the largest finite value (and +-inf) gives +-max; NaN gives NaN; the sign is kept.
    """
    values, codes = positive_grid(table)
    magnitude = torch.clamp(x.double().abs(), max=values[-1].item())
    distance = (magnitude[..., None] - values).abs()
    is_nearest = distance == distance.amin(dim=-1, keepdim=True)
    # Prefer the even code among the nearest (at a tie exactly one of the two is even).
    preference = is_nearest.long() * 2 + (is_nearest & (codes % 2 == 0)).long()
    result = values[preference.argmax(dim=-1)]
    result = torch.where(torch.isnan(magnitude), NAN, result)
    return torch.copysign(result, x.double())


def near_a_midpoint(t: torch.Tensor, points: torch.Tensor, rel: float = 2.0**-18) -> torch.Tensor:
    """True where float64 ``|t|`` is within ``rel`` (relative) of one of ``points``.

    There float32 and float64 arithmetic may round a product to different sides of the tie.
    """
    magnitude = t.double().abs()[..., None]
    return ((magnitude - points).abs() <= rel * points.clamp(min=2.0**-30)).any(dim=-1)


def near_half_integer(t: torch.Tensor, rel: float = 2.0**-18) -> torch.Tensor:
    """True where float64 ``t`` is within ``rel * max(|t|, 1)`` of k + 0.5 (an integer rounding tie)."""
    t = t.double()
    return ((t - torch.floor(t) - 0.5).abs() <= rel * t.abs().clamp(min=1.0))


def random_with_outliers(
    shape: tuple[int, ...], generator: torch.Generator, scale: float = 1.0
) -> torch.Tensor:
    """float32 normal data with ~1% outliers (x30) and a few exact zeros."""
    x = torch.randn(shape, generator=generator) * scale
    outliers = torch.rand(shape, generator=generator) < 0.01
    x = torch.where(outliers, x * 30, x)
    zeros = torch.rand(shape, generator=generator) < 0.01
    return torch.where(zeros, 0.0, x)


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values in float64, NaN where NaN, and the same sign of zero."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    keep = ~torch.isnan(expected)
    assert torch.equal(actual[keep], expected[keep])
    assert torch.equal(torch.signbit(actual[keep]), torch.signbit(expected[keep]))
