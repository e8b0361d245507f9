"""PackedWeight: storage dtypes and sizes, and dequantize() == the TensorQuantizer's fake quant, bit for bit."""

from __future__ import annotations

import pytest
import torch

from lowbit.attributes import QuantizerAttributeConfig
from lowbit.compress.packed import PackedWeight, WeightFormat, quantize_weight
from lowbit.quantizer import TensorQuantizer

NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
MXFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
MXFP8 = {"num_bits": (4, 3), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
# (attributes, storage dtype of codes, codes' last dim as a fraction of K, bytes per bf16 byte at most)
CASES = [
    ({"num_bits": 4, "block_sizes": {-1: 128}}, torch.uint8, 0.5, 0.30),
    ({"num_bits": 4, "block_sizes": {-1: 64}, "asymmetric": True}, torch.uint8, 0.5, 0.30),
    ({"num_bits": 4, "axis": 0, "unsigned": True}, torch.uint8, 0.5, 0.27),
    ({"num_bits": 3, "block_sizes": {-1: 32}, "narrow_range": True}, torch.uint8, 0.5, 0.32),
    ({"num_bits": 8, "axis": 0}, torch.int8, 1, 0.51),
    ({"num_bits": 8, "axis": None}, torch.int8, 1, 0.51),
    ({"num_bits": 6, "block_sizes": {-1: 64}, "asymmetric": True}, torch.uint8, 1, 0.55),
    ({"num_bits": (4, 3), "axis": None}, torch.float8_e4m3fn, 1, 0.51),
    ({"num_bits": (4, 3), "axis": 0}, torch.float8_e4m3fn, 1, 0.51),
    ({"num_bits": (5, 2), "block_sizes": {-1: 64}}, torch.float8_e5m2, 1, 0.54),
    ({"num_bits": (2, 1), "axis": 0}, torch.uint8, 0.5, 0.27),
    (NVFP4, torch.uint8, 0.5, 0.29),
    (MXFP4, torch.uint8, 0.5, 0.27),
    (MXFP8, torch.float8_e4m3fn, 1, 0.52),
]


def _weight(generator: torch.Generator, dtype: torch.dtype, shape=(48, 256)) -> torch.Tensor:
    w = torch.randn(*shape, generator=generator) * 0.05
    outliers = torch.rand(*shape, generator=generator) < 0.01
    return torch.where(outliers, w * 40, w).to(dtype)


def _calibrated(attributes: dict, weight: torch.Tensor) -> TensorQuantizer:
    quantizer = TensorQuantizer(attributes)
    quantizer.enable_calib()
    quantizer.disable_quant()
    quantizer(weight)
    quantizer.load_calib_amax()
    quantizer.disable_calib()
    quantizer.enable_quant()
    return quantizer


def _case_id(value):
    return QuantizerAttributeConfig.from_dict(value).format_name if isinstance(value, dict) else None


@pytest.mark.parametrize("attributes, codes_dtype, codes_fraction, max_ratio", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_equals_fake_quant_bitwise(attributes, codes_dtype, codes_fraction, max_ratio, dtype):
    generator = torch.Generator().manual_seed(0)
    weight = _weight(generator, dtype)
    quantizer = _calibrated(attributes, weight)
    fmt = WeightFormat.from_config(quantizer.config, weight.shape)
    packed = quantize_weight(weight, fmt, amax=quantizer.amax, amin=quantizer.amin)
    assert torch.equal(packed.dequantize(dtype), quantizer(weight))
    assert packed.codes.dtype == codes_dtype
    assert packed.codes.shape == (48, int(256 * codes_fraction))
    assert packed.nbytes <= max_ratio * weight.numel() * 2


def test_dynamic_amax_matches_uncalibrated_quantizer():
    generator = torch.Generator().manual_seed(1)
    weight = _weight(generator, torch.bfloat16)
    quantizer = TensorQuantizer({"num_bits": 4, "block_sizes": {-1: 32}})  # no amax: dynamic
    packed = quantize_weight(weight, WeightFormat.from_config(quantizer.config, weight.shape))
    assert torch.equal(packed.dequantize(torch.bfloat16), quantizer(weight))


def test_int4_codes_against_float64_reference():
    generator = torch.Generator().manual_seed(2)
    weight = _weight(generator, torch.float32, shape=(8, 128))
    packed = quantize_weight(weight, WeightFormat("int", 4, block_size=32))
    blocks = weight.double().reshape(8, 4, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 7  # x_hat = q * amax / qmax
    codes = (blocks / step).round().clamp(-8, 7)
    stored = torch.stack([packed.codes & 15, packed.codes >> 4], -1).reshape(8, 4, 32).double() - 8
    ties = ((blocks / step).abs() % 1 - 0.5).abs() < 1e-6
    assert torch.equal(stored[~ties], codes[~ties])
    error = (packed.dequantize().double().reshape(8, 4, 32) - blocks).abs()
    assert (error <= step / 2 * (1 + 1e-6)).all()


def test_half_precision_scales_are_smaller_and_close():
    generator = torch.Generator().manual_seed(3)
    weight = _weight(generator, torch.bfloat16)
    fmt = WeightFormat("int", 4, block_size=128)
    exact = quantize_weight(weight, fmt)
    half = quantize_weight(weight, fmt, scale_dtype=torch.float16)
    assert half.scale.dtype == torch.float16 and half.nbytes < exact.nbytes
    assert torch.allclose(half.dequantize(), exact.dequantize(), rtol=2e-3, atol=0)


def test_dict_round_trip_and_with_tensors():
    fmt = WeightFormat("nvfp4", (2, 1), block_size=16)
    assert WeightFormat.from_dict(fmt.to_dict()) == fmt
    packed = quantize_weight(torch.randn(16, 64, generator=torch.Generator().manual_seed(4)), fmt)
    moved = packed.with_tensors({name: t.clone() for name, t in packed.tensors().items()})
    assert isinstance(moved, PackedWeight) and torch.equal(moved.dequantize(), packed.dequantize())


@pytest.mark.parametrize(
    "attributes, shape, match",
    [
        ({"num_bits": 4, "axis": 1}, (16, 64), "axis"),
        ({"num_bits": 4, "block_sizes": {0: 16}}, (16, 64), "input dim"),
        ({"num_bits": 4, "block_sizes": {-1: 16, -2: 16}}, (16, 64), "input dim"),
        ({"num_bits": 4, "axis": 0}, (4, 16, 64), "2-D"),
    ],
)
def test_unsupported_granularity(attributes, shape, match):
    with pytest.raises(ValueError, match=match):
        WeightFormat.from_config(QuantizerAttributeConfig.from_dict(attributes), shape)


def test_quantize_weight_errors():
    fmt = WeightFormat("int", 4, block_size=16)
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize_weight(torch.randn(4, 32), fmt, scale_dtype=torch.int8)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(2, 4, 32), fmt)
    with pytest.raises(ValueError, match="kind"):
        WeightFormat.from_dict({"kind": "int5", "num_bits": 5})
