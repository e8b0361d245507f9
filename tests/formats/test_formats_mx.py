"""MX (OCP v1.0) vs a per-block float64 loop written from the spec.

Scaling by a power of two is exact, so elements, scales and dequantized values must match exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats import (
    E2M1,
    E4M3,
    E5M2,
    dequantize_mx,
    e8m0_to_float,
    fake_quant_mx,
    float_to_e8m0,
    quantize_mx,
)

from .reference import (
    E2M1_TABLE,
    E4M3_TABLE,
    E5M2_TABLE,
    assert_same_values,
    nearest_in_table,
    random_with_outliers,
)

ELEMENT_FORMATS = [(E2M1, E2M1_TABLE, 2), (E4M3, E4M3_TABLE, 8), (E5M2, E5M2_TABLE, 15)]


def mx_reference(x: torch.Tensor, table: list[float], emax: int, block_size: int = 32):
    """(elements, biased scale codes) in float64, one block at a time."""
    rows = x.double().reshape(-1, x.shape[-1])
    elements, codes = torch.zeros_like(rows), []
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], block_size):
            block = rows[r, start : start + block_size]
            block_max = block.abs().max().item()
            exponent = -127 if block_max == 0 else math.frexp(block_max)[1] - 1 - emax
            exponent = min(max(exponent, -127), 127)
            codes.append(exponent + 127)
            elements[r, start : start + block_size] = nearest_in_table(block / 2.0**exponent, table)
    n_blocks = x.shape[-1] // block_size
    return elements.reshape(x.shape), torch.tensor(codes).reshape(*x.shape[:-1], n_blocks)


def make_input(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    x = random_with_outliers(shape, generator)
    rows = x.view(-1, shape[-1])
    rows[1, :32] = 0.0  # zero block -> exponent -127
    rows[2, :32] *= 1e-40  # float32 subnormals -> exponent clamped at -127
    rows[3, :32] *= 1e30  # large block
    return x


@pytest.mark.parametrize("shape", [(8, 64), (3, 5, 32)])
@pytest.mark.parametrize("fmt, table, emax", ELEMENT_FORMATS, ids=["E2M1", "E4M3", "E5M2"])
def test_quantize_mx_matches_block_loop(fmt, table, emax, shape):
    x = make_input(shape, seed=emax)
    expected_elements, expected_codes = mx_reference(x, table, emax)
    elements, scale = quantize_mx(x, fmt)
    assert elements.dtype == torch.float32 and elements.shape == x.shape
    assert scale.dtype == torch.uint8 and scale.shape == (*shape[:-1], shape[-1] // 32)
    assert torch.equal(scale.long(), expected_codes)
    assert_same_values(elements, expected_elements)
    assert scale.view(-1)[2 * (shape[-1] // 32)].item() == 0  # the zero block

    scales = torch.exp2(expected_codes.double() - 127).repeat_interleave(32, dim=-1)
    expected = expected_elements * scales
    assert_same_values(dequantize_mx(elements, scale), expected.float().double())
    assert_same_values(fake_quant_mx(x, fmt), expected.float().double())


def test_e8m0_all_codes():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = torch.tensor([2.0 ** (c - 127) for c in range(255)] + [math.nan], dtype=torch.float64)
    assert_same_values(e8m0_to_float(codes), expected)
    assert torch.equal(float_to_e8m0(torch.arange(-127, 128)), codes[:255])
    assert float_to_e8m0(torch.tensor([-200.0, 300.0, math.nan])).tolist() == [0, 254, 255]


def test_non_finite_block_gets_nan_scale():
    x = torch.ones(2, 32)
    x[0, 3] = math.nan
    x[1, 5] = math.inf
    elements, scale = quantize_mx(x, E4M3)
    assert scale.tolist() == [[255], [255]]
    assert torch.isnan(dequantize_mx(elements, scale)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_returns_input_dtype(dtype):
    x = random_with_outliers((4, 64), torch.Generator().manual_seed(2)).to(dtype)
    result = fake_quant_mx(x, E2M1)
    assert result.dtype == dtype
    assert torch.equal(result, fake_quant_mx(x.float(), E2M1).to(dtype))


def test_errors():
    with pytest.raises(ValueError, match="block_size 32 must divide the length 48"):
        quantize_mx(torch.ones(2, 48), E2M1)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        quantize_mx(torch.ones(2, 32, dtype=torch.int64), E2M1)
    elements, scale = quantize_mx(torch.ones(2, 64), E2M1)
    with pytest.raises(ValueError, match=r"scale_e8m0 of shape \(2, 2\) must be"):
        dequantize_mx(elements[:, :33], scale)
    with pytest.raises(ValueError, match="scale_e8m0"):
        dequantize_mx(elements[:1], scale)
    with pytest.raises(TypeError, match="scale_e8m0"):
        dequantize_mx(elements, scale.float())
    with pytest.raises(TypeError, match="exponent"):
        float_to_e8m0(3)
