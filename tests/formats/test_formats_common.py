"""Exactness of the shared helpers the formats (and other packages) build on."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats._common import as_float32_like, divide, pow2

from .reference import random_with_outliers


def test_pow2_is_exact_over_the_float32_range():
    exponents = torch.arange(-149, 128)
    expected = torch.tensor([math.ldexp(1.0, k) for k in range(-149, 128)], dtype=torch.float64)
    assert torch.equal(pow2(exponents).double(), expected)
    assert torch.equal(pow2(exponents.float()).double(), expected)


def test_divide_is_correctly_rounded_true_division():
    # float64 division rounded to float32 is the correctly rounded float32 quotient (53 >= 2 * 24 + 2).
    x = random_with_outliers((4096,), torch.Generator().manual_seed(29)).abs() + 1e-3
    for numerator, denominator in [(x, 2688.0), (127.0, x), (x, x.flip(0))]:
        as64 = [v.double() if isinstance(v, torch.Tensor) else v for v in (numerator, denominator)]
        assert torch.equal(divide(numerator, denominator), (as64[0] / as64[1]).float())


def test_as_float32_like_accepts_numbers_and_rejects_integer_tensors():
    like = torch.ones(2)
    assert as_float32_like(3, like, "amax").dtype == torch.float32
    with pytest.raises(TypeError, match="amax must be a floating-point tensor"):
        as_float32_like(torch.tensor([3]), like, "amax")
