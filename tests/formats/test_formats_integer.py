"""Integer formats vs float64 formulas written here.

Tolerance: codes must equal the float64 reference exactly, except where the float64 product lies within
2**-18 (relative) of a rounding tie, where float32 arithmetic may land on either side; dequantized values
must match to 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import (
    block_amax,
    dequantize_int,
    dequantize_int_asym,
    fake_quant_int,
    fake_quant_int_asym,
    from_blocks,
    int_range,
    quantize_int,
    quantize_int_asym,
    to_blocks,
)

from .reference import near_half_integer, random_with_outliers

ALL_BITS = range(2, 9)
MODES = {"signed": {}, "unsigned": {"unsigned": True}, "narrow": {"narrow_range": True}}
GRANULARITIES = ["tensor", "channel0", "channel1", "block16", "block128"]


def reference_range(num_bits: int, unsigned: bool = False, narrow_range: bool = False) -> tuple[int, int]:
    if unsigned:
        return 0, 2**num_bits - 1
    return (-(2 ** (num_bits - 1)) + (1 if narrow_range else 0)), 2 ** (num_bits - 1) - 1


def data_and_amax(granularity: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, amax) with amax at 0.8x the data's max (so outliers clip) and one amax == 0 group."""
    generator = torch.Generator().manual_seed(seed)
    x = random_with_outliers((16, 256), generator)
    if granularity == "tensor":
        return x, x.abs().amax() * 0.8
    if granularity.startswith("channel"):
        axis = 1 - int(granularity[-1])  # per-channel along dim 0 reduces over dim 1, and vice versa
        amax = x.abs().amax(dim=axis, keepdim=True) * 0.8
        amax.view(-1)[3] = 0.0
        return x, amax
    blocks = to_blocks(x, int(granularity.removeprefix("block")))
    amax = blocks.abs().amax(dim=-1, keepdim=True) * 0.8
    amax.view(-1)[5] = 0.0
    return blocks, amax


@pytest.mark.parametrize("num_bits", ALL_BITS)
@pytest.mark.parametrize("mode", MODES)
def test_int_range_matches_formula(num_bits, mode):
    assert int_range(num_bits, **MODES[mode]) == reference_range(num_bits, **MODES[mode])


def test_int_range_known_values():
    assert int_range(8) == (-128, 127)
    assert int_range(8, narrow_range=True) == (-127, 127)
    assert int_range(8, unsigned=True) == (0, 255)
    assert int_range(4) == (-8, 7)
    assert int_range(2) == (-2, 1)


@pytest.mark.parametrize("num_bits", [1, 9, 0, 4.0, True, "8"])
def test_int_range_rejects_num_bits(num_bits):
    with pytest.raises(ValueError, match="num_bits"):
        int_range(num_bits)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_bits", ALL_BITS)
def test_quantize_int_matches_float64(num_bits, mode, granularity):
    options = MODES[mode]
    x, amax = data_and_amax(granularity, seed=num_bits * 31 + len(mode))
    qmin, qmax = reference_range(num_bits, **options)
    x64, amax64 = x.double(), amax.double()
    is_zero = amax64 == 0
    scale64 = torch.where(is_zero, 1.0, qmax / torch.where(is_zero, 1.0, amax64))
    product = x64 * scale64
    codes64 = torch.where(is_zero, 0.0, torch.clamp(torch.round(product), qmin, qmax))

    codes, scale = quantize_int(x, amax, num_bits, **options)
    assert codes.dtype == torch.float32 and scale.shape == amax.shape
    torch.testing.assert_close(scale.double(), scale64, rtol=1e-6, atol=0)
    decided = ~near_half_integer(product) | is_zero
    assert torch.equal(codes.double()[decided], codes64.expand_as(codes)[decided])
    assert ((codes.double() - codes64).abs() <= 1).all()
    assert codes.min() >= qmin and codes.max() <= qmax

    expected = (codes.double() / scale64).expand_as(codes)  # same codes, float64 division
    result = fake_quant_int(x, amax, num_bits, **options)
    torch.testing.assert_close(result.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(dequantize_int(codes, scale).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("num_bits", ALL_BITS)
def test_quantize_int_asym_matches_float64(num_bits, granularity):
    x, amax = data_and_amax(granularity, seed=num_bits)
    # Asymmetric ranges from the data (shifted so the range does not always contain 0), then clip.
    reduce_dims = {"tensor": None, "channel0": 1, "channel1": 0}.get(granularity, -1)
    shifted = x + 2.0
    if reduce_dims is None:
        xmin, xmax = shifted.amin() * 0.9, shifted.amax() * 0.9
    else:
        xmin = shifted.amin(dim=reduce_dims, keepdim=True) * 0.9
        xmax = shifted.amax(dim=reduce_dims, keepdim=True) * 0.9
    qmax = 2**num_bits - 1
    low, high = xmin.double().clamp(max=0), xmax.double().clamp(min=0)
    scale64 = (high - low) / qmax
    zero64 = torch.clamp(torch.round(-low / scale64), 0, qmax)
    quotient = shifted.double() / scale64
    codes64 = torch.clamp(torch.round(quotient) + zero64, 0, qmax)

    codes, scale, zero_point = quantize_int_asym(shifted, xmin, xmax, num_bits)
    torch.testing.assert_close(scale.double(), scale64, rtol=1e-6, atol=0)
    assert torch.equal(zero_point.double(), zero64)  # -low/scale is far from ties for this data
    decided = ~near_half_integer(quotient)
    assert torch.equal(codes.double()[decided], codes64[decided])
    assert ((codes.double() - codes64).abs() <= 1).all()
    expected = (codes.double() - zero64) * scale64
    dequantized = dequantize_int_asym(codes, scale, zero_point)
    torch.testing.assert_close(dequantized.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        fake_quant_int_asym(shifted, xmin, xmax, num_bits).double(), expected, rtol=1e-6, atol=1e-7
    )


def test_asym_zero_is_exact_and_range_widened():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    codes, scale, zero_point = quantize_int_asym(x, xmin=1.0, xmax=3.0, num_bits=8)
    assert zero_point.item() == 0 and scale.item() == pytest.approx(3.0 / 255)
    assert fake_quant_int_asym(x, 1.0, 3.0, 8)[0].item() == 0.0
    x = torch.tensor([-3.0, -1.0, 0.0])
    codes, scale, zero_point = quantize_int_asym(x, xmin=-3.0, xmax=-1.0, num_bits=8)
    assert zero_point.item() == 255 and codes.tolist() == [0.0, 170.0, 255.0]


def test_asym_degenerate_range_gives_zeros():
    x = torch.zeros(4)
    codes, scale, zero_point = quantize_int_asym(x, torch.tensor(0.0), torch.tensor(0.0), 4)
    assert scale.item() == 1.0 and zero_point.item() == 0 and codes.eq(0).all()
    assert fake_quant_int_asym(x, 0.0, 0.0, 4).eq(0).all()


def test_round_half_even_ties_exact():
    # amax = qmax makes scale exactly 1, so x * scale is exactly the tie.
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 126.5, -127.5])
    codes, scale = quantize_int(x, torch.tensor(127.0), 8)
    assert scale.item() == 1.0
    assert codes.tolist() == [0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0, -4.0, 126.0, -128.0]
    # scale 2: 0.25 -> 0.5 -> 0, 0.75 -> 1.5 -> 2
    codes, _ = quantize_int(torch.tensor([0.25, 0.75, 1.25]), torch.tensor(3.5), 4)
    assert codes.tolist() == [0.0, 2.0, 2.0]


def test_unsigned_clamps_negatives_to_zero():
    codes, _ = quantize_int(torch.tensor([-5.0, -0.1, 0.3, 1.0]), torch.tensor(1.0), 4, unsigned=True)
    assert codes.tolist() == [0.0, 0.0, 4.0, 15.0]


def test_zero_amax_rows_give_zero_codes_and_unit_scale():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
    amax = torch.tensor([[0.0], [3.0], [2.0**-30]])
    codes, scale = quantize_int(x, amax, 8)
    assert scale[0].item() == 1.0 and scale[2].item() == 1.0
    assert codes[0].eq(0).all() and codes[2].eq(0).all()  # ModelOpt: amax <= 2**-24 quantizes to 0
    assert codes[1].tolist() == [42.0, -85.0, 127.0]
    result = fake_quant_int(x, amax, 8)
    assert torch.isfinite(result).all() and result[0].eq(0).all()


def test_per_block_roundtrip_through_blocks():
    generator = torch.Generator().manual_seed(7)
    x = random_with_outliers((4, 64), generator)
    amax = block_amax(x, 16, axis=1)
    blocked = fake_quant_int(to_blocks(x, 16, axis=1), amax, 4)
    result = from_blocks(blocked, x.shape, axis=1)
    assert result.shape == x.shape
    assert ((result - x).abs() <= amax.repeat_interleave(16, dim=-2).reshape(4, 64) / 7 / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_upcast_and_return_input_dtype(dtype):
    generator = torch.Generator().manual_seed(3)
    x = random_with_outliers((8, 32), generator).to(dtype)
    amax = x.float().abs().amax(dim=1, keepdim=True).to(dtype)
    result = fake_quant_int(x, amax, 8)
    assert result.dtype == dtype
    expected = fake_quant_int(x.float(), amax.float(), 8).to(dtype)
    assert torch.equal(result, expected)
    assert fake_quant_int_asym(x, amax * -1, amax, 8).dtype == dtype


def test_python_float_amax_is_accepted():
    x = torch.tensor([0.3, -1.2])
    assert torch.equal(fake_quant_int(x, 1.0, 8), fake_quant_int(x, torch.tensor(1.0), 8))


def test_errors_name_the_parameter():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        quantize_int(torch.arange(4), torch.tensor(1.0), 8)
    with pytest.raises(TypeError, match="amax"):
        quantize_int(torch.ones(4), torch.tensor(1), 8)
    with pytest.raises(TypeError, match="xmin"):
        quantize_int_asym(torch.ones(4), torch.tensor(0), torch.tensor(1.0), 8)
    with pytest.raises(TypeError, match="codes"):
        dequantize_int(torch.ones(4, dtype=torch.int8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="num_bits"):
        fake_quant_int(torch.ones(4), torch.tensor(1.0), 9)
    with pytest.raises(ValueError, match="num_bits"):
        fake_quant_int_asym(torch.ones(4), 0.0, 1.0, 1)
