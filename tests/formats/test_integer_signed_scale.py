"""The signed-scale symmetric integer grid (NNCF's INT4_SYM / INT8_SYM, llama.cpp Q4_0) against a float64
reference written from NNCF's definition, the tie rule, tiny ranges, and its quantizer / packed round trip."""

from __future__ import annotations

import pytest
import torch

from lowbit import formats
from lowbit.attributes import QuantizerAttributeConfig
from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.quantizer import TensorQuantizer


def reference(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per group: step = |min| / 2^(b-1) if |min| >= max else -max / 2^(b-1); codes clamp(round(w / step))."""
    g = w.double().reshape(w.shape[0], -1, group)
    low, high = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    step = torch.where(-low >= high, -low, -high) / 2 ** (bits - 1)
    return (torch.clamp(torch.round(g / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step).reshape(w.shape)


def weights(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 128, generator=generator) * 0.05
    outliers = torch.rand(24, 128, generator=generator) < 0.02
    return torch.where(outliers, w * 12, w)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_fake_quant_matches_reference(bits, seed):
    w = weights(seed)
    groups = w.reshape(24, -1, 32)
    out = formats.fake_quant_int_signed_scale(groups, groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True),
                                              bits).reshape(w.shape)
    torch.testing.assert_close(out.double(), reference(w, bits, 32), rtol=1e-6, atol=1e-7)


def test_larger_end_maps_onto_qmin_and_ties_take_the_negative_end():
    x = torch.tensor([[0.8, -0.3, 0.1], [-0.8, 0.8, 0.2], [-0.5, 0.9, 0.0]])
    codes, scale = formats.quantize_int_signed_scale(x, x.amin(1, keepdim=True), x.amax(1, keepdim=True), 4)
    assert codes[0, 0] == -8 and scale[0, 0] < 0  # positive larger end: negative scale
    assert codes[1, 0] == -8 and scale[1, 0] > 0 and codes[1, 1] == 7  # tie: min maps onto -8, max clamps to 7
    assert codes[2, 1] == -8 and codes[2, 0] == 4  # -0.5 / (-0.9 / 8) = 4.44 -> 4
    low, high = formats.signed_scale_range(1.0 / scale, 4)  # the grid's own ends give the same grid
    again, _ = formats.quantize_int_signed_scale(x, low, high, 4)
    assert torch.equal(again, codes)


def test_tiny_range_gives_zero_codes_and_unit_scale():
    x = torch.zeros(2, 4)
    codes, scale = formats.quantize_int_signed_scale(x, torch.zeros(2, 1), torch.zeros(2, 1), 4)
    assert torch.equal(codes, torch.zeros(2, 4)) and torch.equal(scale, torch.ones(2, 1))


def test_quantizer_and_packed_storage_agree_with_reference():
    """A calibrated signed-scale quantizer, blocks of 32: fake quant == reference, and the packed weight (float32
    scales, signed) dequantizes to the fake-quantized weight bit for bit."""
    w = weights(2)
    config = QuantizerAttributeConfig(num_bits=4, block_sizes={-1: 32}, signed_scale=True)
    quantizer = TensorQuantizer(config)
    quantizer.enable_calib()
    quantizer.disable_quant()
    quantizer(w)
    quantizer.load_calib_amax()
    quantizer.disable_calib()
    quantizer.enable_quant()
    fake = quantizer(w)
    torch.testing.assert_close(fake.double(), reference(w, 4, 32), rtol=1e-6, atol=1e-7)
    fmt = WeightFormat.from_config(config, tuple(w.shape))
    packed = quantize_weight(w, fmt, amax=quantizer.amax, amin=quantizer.amin)
    assert fmt.signed_scale and (packed.scale < 0).any() and (packed.scale > 0).any()
    assert torch.equal(packed.dequantize(), fake)
    assert WeightFormat.from_dict(fmt.to_dict()) == fmt


@pytest.mark.parametrize("attributes", [
    {"num_bits": 4, "signed_scale": True, "asymmetric": True},
    {"num_bits": 4, "signed_scale": True, "calibrator": "mse"},
    {"num_bits": (4, 3), "signed_scale": True},
    {"num_bits": 4, "signed_scale": True, "unsigned": True},
])
def test_signed_scale_errors_name_the_attributes(attributes):
    with pytest.raises(ValueError, match="signed_scale=True is a symmetric integer grid calibrated by 'max'"):
        QuantizerAttributeConfig(**attributes)
