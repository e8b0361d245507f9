"""TensorQuantizer with FP8 (E4M3, E5M2), FP4 E2M1, NVFP4 and MX vs float64 references.

The minifloat grids are decoded from their bit layouts in tests/core/reference.py; NVFP4 and MX are
per-block float64 loops written from ModelOpt's NVFP4 and the OCP MX v1.0 definitions (not lowbit's
format functions). Tolerance as in reference.assert_matches: 2**-21 relative, one grid step where a
float64 quotient is within 2**-21 of a rounding tie (for NVFP4 a tied E4M3 block scale frees the block).
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import QuantizerAttributeConfig, SequentialQuantizer, TensorQuantizer

from .helpers import calibrate_quantizer
from .reference import (
    FORMATS,
    assert_matches,
    fp_reference,
    group_reduce,
    int_reference,
    mx_reference,
    nvfp4_reference,
    random_with_outliers,
)

GRANULARITIES = {
    "per-tensor": {},
    "axis0": {"axis": 0},
    "axis1": {"axis": 1},
    "block16": {"block_sizes": {-1: 16}},
    "block32x32": {"block_sizes": {-1: 32, -2: 32}},
}
NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


def mx(num_bits):
    return {"num_bits": num_bits, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}


@pytest.mark.parametrize("calibrated", [False, True], ids=["dynamic", "calibrated"])
@pytest.mark.parametrize("granularity_name", list(GRANULARITIES))
@pytest.mark.parametrize("num_bits", [(4, 3), (5, 2), (2, 1)], ids=["e4m3", "e5m2", "e2m1"])
def test_scaled_minifloat(num_bits, granularity_name, calibrated):
    granularity = GRANULARITIES[granularity_name]
    generator = torch.Generator().manual_seed(sum(num_bits) + len(granularity_name))
    x = random_with_outliers((32, 128), generator)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=num_bits, **granularity))
    batches = [x]
    if calibrated:
        batches = [random_with_outliers((32, 128), generator) for _ in range(2)]
        calibrate_quantizer(quantizer, *batches)
    axis, block_sizes = granularity.get("axis"), granularity.get("block_sizes")
    amax = torch.stack([group_reduce(b, "absmax", axis, block_sizes) for b in batches]).amax(0)
    assert_matches(quantizer(x), fp_reference(x, amax, FORMATS[num_bits]))


def test_fp8_per_token_dynamic_ignores_calibration():
    """FP8_PER_CHANNEL_PER_TOKEN's activations: block_sizes {-1: None, type: dynamic}, amax per row of x."""
    generator = torch.Generator().manual_seed(7)
    x = random_with_outliers((4, 8, 64), generator)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), block_sizes={-1: None, "type": "dynamic"}))
    calibrate_quantizer(quantizer, random_with_outliers((4, 8, 64), generator) * 0.1)
    assert quantizer.amax is None
    amax = group_reduce(x, "absmax", block_sizes={-1: None})
    assert_matches(quantizer(x), fp_reference(x, amax, FORMATS[(4, 3)]))


def test_fp8_pre_quant_scale():
    generator = torch.Generator().manual_seed(5)
    x = random_with_outliers((16, 64), generator)
    scale = torch.rand(64, generator=generator) + 0.5
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3)))
    quantizer.pre_quant_scale = scale
    scaled = x * scale
    assert_matches(quantizer(x), fp_reference(scaled, scaled.abs().amax().double(), FORMATS[(4, 3)]))


@pytest.mark.parametrize("calibrated", [False, True], ids=["dynamic", "calibrated"])
def test_nvfp4(calibrated):
    generator = torch.Generator().manual_seed(11)
    x = random_with_outliers((16, 128), generator)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(**NVFP4))
    global_amax = x.abs().max().item()
    if calibrated:
        calibration = random_with_outliers((16, 128), generator) * 0.5  # x exceeds it: block scales saturate
        calibrate_quantizer(quantizer, calibration)
        assert quantizer.amax.numel() == 1, "NVFP4 calibrates one global (per-tensor) amax"
        global_amax = calibration.abs().max().item()
        assert quantizer.amax.item() == global_amax
    else:
        assert quantizer.amax is None
    assert_matches(quantizer(x), nvfp4_reference(x, global_amax))


@pytest.mark.parametrize("num_bits", [(2, 1), (4, 3), (5, 2)], ids=["mxfp4", "mxfp8-e4m3", "mxfp8-e5m2"])
def test_mx(num_bits):
    generator = torch.Generator().manual_seed(13)
    x = random_with_outliers((16, 128), generator)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(**mx(num_bits)))
    reference = mx_reference(x, FORMATS[num_bits])
    assert_matches(quantizer(x), reference)
    calibrate_quantizer(quantizer, random_with_outliers((16, 128), generator))
    assert quantizer.amax is None, "MX scales are dynamic: calibration has nothing to keep"
    assert_matches(quantizer(x), reference)


def test_mx_scale_range_extremes():
    """Blocks with tiny and huge magnitudes: the shared exponent spans far beyond one binade."""
    generator = torch.Generator().manual_seed(17)
    x = random_with_outliers((4, 128), generator)
    x = x * torch.tensor([2.0**-60, 2.0**-10, 1.0, 2.0**40])[:, None]
    quantizer = TensorQuantizer(QuantizerAttributeConfig(**mx((2, 1))))
    assert_matches(quantizer(x), mx_reference(x, FORMATS[(2, 1)]))


def test_sequential_int4_then_fp8_like_w4a8():
    """W4A8's weight quantizer: INT4 blocks of 128, then FP8 per tensor of that result (each calibrated
    on what reaches it). Reference: the two float64 references composed."""
    generator = torch.Generator().manual_seed(19)
    weight = random_with_outliers((32, 256), generator)
    model = torch.nn.Linear(256, 32, bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    config = {"quant_cfg": {"*weight_quantizer": [{"num_bits": 4, "block_sizes": {-1: 128}}, {"num_bits": (4, 3)}],
                            "default": {"enable": False}}}
    lowbit.quantize(model, config)
    assert isinstance(model.weight_quantizer, SequentialQuantizer)
    int4 = int_reference(weight, group_reduce(weight, "absmax", block_sizes={-1: 128}), 4)
    assert_matches(model.weight_quantizer[0](weight), int4)
    first = int4.values.float()
    expected = fp_reference(first, first.abs().max().double(), FORMATS[(4, 3)])
    assert_matches(model.quantized_weight(), expected)
