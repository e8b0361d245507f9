"""FP8 (E4M3, E5M2) and FP4 (E2M1) rounding vs exhaustive code tables decoded from the bit layout.

Tolerance: round_to_format must equal the nearest table entry exactly (ties to the even code). For
fake_quant_fp the float32 product x * scale may round to the other side of a tie when it lies within
2**-18 (relative) of a midpoint; those entries are excluded, all others must match to 1e-6 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats import (
    E2M1,
    E4M3,
    E5M2,
    decode_e2m1,
    dequantize_fp,
    encode_e2m1,
    fake_quant_fp,
    float_format,
    quantize_fp,
    round_to_format,
)
from lowbit.formats.minifloat import _round_generic, float8_to_float32

from .reference import (
    E2M1_TABLE,
    E4M3_TABLE,
    E5M2_TABLE,
    assert_same_values,
    midpoints,
    near_a_midpoint,
    nearest_in_table,
    positive_grid,
    random_with_outliers,
)

FORMATS = [(E4M3, E4M3_TABLE), (E5M2, E5M2_TABLE), (E2M1, E2M1_TABLE)]
FORMAT_IDS = ["E4M3", "E5M2", "E2M1"]
TORCH_FP8 = {"E4M3": torch.float8_e4m3fn, "E5M2": torch.float8_e5m2}


def both_roundings(x, fmt):
    """The public rounding and the generic one (for FP8 the public one uses torch's cast)."""
    return [round_to_format(x, fmt), _round_generic(x.float(), fmt).to(x.dtype)]


def log_uniform_values(fmt, table, count, generator):
    """Random magnitudes from below the smallest subnormal to 4x max, random signs, float32."""
    values, _ = positive_grid(table)
    low, high = math.log2(values[1].item()) - 3, math.log2(values[-1].item()) + 2
    exponent = torch.rand(count, generator=generator, dtype=torch.float64) * (high - low) + low
    sign = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0).double()
    return (sign * torch.exp2(exponent)).float()


@pytest.mark.parametrize("name", ["E4M3", "E5M2"])
def test_fp8_table_matches_torch_bit_decode(name):
    """The hand-written table and torch's float8 dtypes agree on all 256 codes (NaN where NaN)."""
    table = torch.tensor({"E4M3": E4M3_TABLE, "E5M2": E5M2_TABLE}[name], dtype=torch.float64)
    decoded = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(TORCH_FP8[name]).double()
    assert_same_values(decoded, table)


@pytest.mark.parametrize("name", ["E4M3", "E5M2"])
def test_float8_to_float32_decodes_every_code_by_bit_layout(name):
    """The CPU table decode (E4M3) and the plain cast (E5M2) give the bit-layout values of all 256 codes,
    in any shape (codes shuffled into a 3-d, non-contiguous tensor)."""
    table = torch.tensor({"E4M3": E4M3_TABLE, "E5M2": E5M2_TABLE}[name], dtype=torch.float64)
    order = torch.randperm(512, generator=torch.Generator().manual_seed(7)) % 256
    codes = order.to(torch.uint8).view(TORCH_FP8[name]).reshape(8, 16, 4).transpose(0, 2)
    decoded = float8_to_float32(codes)
    assert decoded.dtype == torch.float32 and decoded.shape == codes.shape
    assert_same_values(decoded.double().reshape(-1), table[order.reshape(8, 16, 4).transpose(0, 2).reshape(-1)])


@pytest.mark.parametrize("fmt, table", FORMATS, ids=FORMAT_IDS)
def test_every_finite_code_is_a_fixed_point(fmt, table):
    finite = torch.tensor([v for v in table if math.isfinite(v)], dtype=torch.float64)
    for rounded in both_roundings(finite.float(), fmt):
        assert_same_values(rounded, finite)


@pytest.mark.parametrize("fmt, table", FORMATS, ids=FORMAT_IDS)
def test_format_constants_match_table(fmt, table):
    values, _ = positive_grid(table)
    assert fmt.max_value == values[-1].item()
    assert fmt.max_exponent == math.floor(math.log2(fmt.max_value))
    assert 1 + fmt.exponent_bits + fmt.mantissa_bits == int(math.log2(len(table)))
    assert fmt.has_inf == any(math.isinf(v) for v in table)
    assert fmt.has_nan == any(math.isnan(v) for v in table)


@pytest.mark.parametrize("fmt, table", FORMATS, ids=FORMAT_IDS)
def test_random_values_round_to_nearest_table_entry(fmt, table):
    generator = torch.Generator().manual_seed(11)
    x = log_uniform_values(fmt, table, 20000, generator)
    expected = nearest_in_table(x, table)
    for rounded in both_roundings(x, fmt):
        assert_same_values(rounded, expected)


@pytest.mark.parametrize("fmt, table", FORMATS, ids=FORMAT_IDS)
def test_midpoints_tie_to_even_code_and_neighbours_round_to_nearer(fmt, table):
    points = midpoints(table).float()  # every midpoint is exact in float32
    above = torch.nextafter(points, torch.tensor(math.inf))
    below = torch.nextafter(points, torch.tensor(0.0))
    x = torch.cat([points, -points, above, -above, below, -below])
    expected = nearest_in_table(x, table)
    values, codes = positive_grid(table)
    even_side = values[torch.searchsorted(values, points.double()) - 1 + (codes[1:] % 2 == 0).long()]
    assert torch.equal(expected[: len(points)], even_side)  # the reference itself ties to even
    for rounded in both_roundings(x, fmt):
        assert_same_values(rounded, expected)


@pytest.mark.parametrize("fmt, table", FORMATS, ids=FORMAT_IDS)
def test_subnormals(fmt, table):
    values, _ = positive_grid(table)
    smallest = values[1].item()
    assert smallest == 2.0 ** (fmt.min_exponent - fmt.mantissa_bits)
    x = torch.tensor([smallest, smallest / 2, smallest * 0.51, smallest * 1.5, smallest * 2.5, smallest / 4])
    expected = torch.tensor([smallest, 0.0, smallest, 2 * smallest, 2 * smallest, 0.0], dtype=torch.float64)
    for rounded in both_roundings(x, fmt):
        assert_same_values(rounded, expected)
        assert_same_values(rounded.neg(), -expected)


@pytest.mark.parametrize("fmt, table", FORMATS, ids=FORMAT_IDS)
def test_saturation_infinity_and_nan(fmt, table):
    top = fmt.max_value
    x = torch.tensor([top * 1.01, top * 1.2, 1e30, 3.4e38, math.inf, -math.inf, -top * 1.5, math.nan, -0.0])
    expected = torch.tensor([top, top, top, top, top, -top, -top, math.nan, -0.0], dtype=torch.float64)
    for rounded in both_roundings(x, fmt):
        assert_same_values(rounded, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt, table", FORMATS, ids=FORMAT_IDS)
def test_half_inputs_round_in_float32_and_keep_dtype(fmt, table, dtype):
    generator = torch.Generator().manual_seed(5)
    x = random_with_outliers((64, 64), generator).to(dtype)
    rounded = round_to_format(x, fmt)
    assert rounded.dtype == dtype
    assert_same_values(rounded.double(), nearest_in_table(x.float(), table))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("fmt, table", FORMATS, ids=FORMAT_IDS)
def test_fake_quant_fp_matches_float64(fmt, table, per_channel):
    generator = torch.Generator().manual_seed(13)
    x = random_with_outliers((16, 128), generator)
    amax = x.abs().amax(dim=1, keepdim=True) if per_channel else x.abs().amax()
    amax = amax * 0.7  # outliers saturate
    scale64 = fmt.max_value / amax.double()
    product = x.double() * scale64
    expected = nearest_in_table(product, table) / scale64
    result = fake_quant_fp(x, amax, fmt)
    assert result.dtype == torch.float32
    decided = ~near_a_midpoint(product, midpoints(table))
    torch.testing.assert_close(result.double()[decided], expected[decided], rtol=1e-6, atol=0)
    assert decided.float().mean() > 0.99


def test_fake_quant_fp_zero_amax_is_finite():
    x = torch.tensor([[0.0, 0.0], [1.0, -3.0]])
    amax = torch.tensor([[0.0], [448.0]])  # scale 1 on row 1
    result = fake_quant_fp(x, amax, E4M3)
    assert torch.isfinite(result).all() and result[0].eq(0).all()
    assert result[1].tolist() == [1.0, -3.0]


def test_float_format_mapping_and_error():
    assert float_format((4, 3)) is E4M3 and float_format((5, 2)) is E5M2 and float_format((2, 1)) is E2M1
    with pytest.raises(ValueError, match=r"num_bits must be one of \[\(2, 1\), \(4, 3\), \(5, 2\)\]"):
        float_format((3, 2))
    with pytest.raises(ValueError, match="num_bits"):
        float_format(8)


def test_e2m1_all_codes_decode_by_bit_layout():
    codes = torch.arange(16, dtype=torch.uint8)
    assert_same_values(decode_e2m1(codes), torch.tensor(E2M1_TABLE, dtype=torch.float64))
    assert decode_e2m1(codes).dtype == torch.float32
    assert E2M1_TABLE[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_e2m1_encode_decode_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(encode_e2m1(decode_e2m1(codes)), codes)
    assert encode_e2m1(torch.tensor(1.0)).dtype == torch.uint8


def test_e2m1_tie_midpoints():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # the even code of each pair
    assert round_to_format(ties, E2M1).tolist() == expected
    assert round_to_format(-ties, E2M1).tolist() == [-v for v in expected]
    assert encode_e2m1(ties).tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert encode_e2m1(-ties).tolist() == [8, 10, 10, 12, 12, 14, 14]


def test_e2m1_encode_rounds_off_grid_values_and_saturates():
    generator = torch.Generator().manual_seed(17)
    x = random_with_outliers((4096,), generator, scale=3.0)
    assert_same_values(decode_e2m1(encode_e2m1(x)), nearest_in_table(x, E2M1_TABLE))
    assert encode_e2m1(torch.tensor([7.0, -100.0, math.inf, math.nan])).tolist() == [7, 15, 7, 7]


def test_minifloat_errors_name_the_parameter():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        round_to_format(torch.arange(3), E4M3)
    with pytest.raises(TypeError, match="amax"):
        fake_quant_fp(torch.ones(3), torch.tensor(1), E4M3)
    with pytest.raises(TypeError, match="codes"):
        decode_e2m1(torch.ones(3))
    with pytest.raises(TypeError, match="x must be"):
        encode_e2m1(torch.ones(3, dtype=torch.int32))


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1], ids=FORMAT_IDS)
def test_quantize_fp_values_and_scale_compose_to_fake_quant(fmt):
    generator = torch.Generator().manual_seed(19)
    x = random_with_outliers((8, 64), generator).bfloat16()
    amax = x.float().abs().amax(dim=1, keepdim=True)
    amax[2] = 0.0
    values, scale = quantize_fp(x, amax, fmt)
    assert values.dtype == torch.float32 and scale.shape == amax.shape
    assert torch.equal(round_to_format(values, fmt), values)  # on the grid
    assert scale[2].item() == 1.0
    torch.testing.assert_close(scale.double()[amax > 0], fmt.max_value / amax.double()[amax > 0], rtol=1e-7, atol=0)
    assert torch.equal(dequantize_fp(values, scale, x.dtype), fake_quant_fp(x, amax, fmt))
    with pytest.raises(TypeError, match="values"):
        dequantize_fp(values.int(), scale)
