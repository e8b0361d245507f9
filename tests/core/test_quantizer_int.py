"""TensorQuantizer with integer formats vs float64 references (tests/core/reference.py).

Every bit width 2..8 in four code ranges (signed, unsigned, narrow_range, asymmetric), at every
granularity (per-tensor, per-channel axis 0 / 1 / (0, 2), blocks {-1: 16}, {-1: 128}, {-1: 32, -2: 32}),
with a dynamic amax (from the input) and a calibrated one (max over three other batches, so the test
batch has values beyond it that must clamp), and with a pre_quant_scale.

Tolerance (reference.assert_matches): equal to the float64 reference within 2**-21 relative, except
where the float64 scaled value lies within 2**-21 (relative) of a rounding tie, where one grid step
is allowed; at most 1% of elements may be ties.
"""

from __future__ import annotations

import pytest
import torch

from lowbit import QuantizerAttributeConfig, TensorQuantizer

from .helpers import calibrate_quantizer
from .reference import assert_matches, group_reduce, int_asym_reference, int_reference, random_with_outliers

MODES = {
    "signed": {},
    "unsigned": {"unsigned": True},
    "narrow": {"narrow_range": True},
    "asym": {"asymmetric": True},
}
GRANULARITIES = {
    "per-tensor": ({}, (64, 256)),
    "axis0": ({"axis": 0}, (64, 256)),
    "axis1": ({"axis": 1}, (64, 256)),
    "axis(0,2)": ({"axis": (0, 2)}, (4, 6, 64)),
    "block16": ({"block_sizes": {-1: 16}}, (64, 256)),
    "block128": ({"block_sizes": {-1: 128}}, (64, 256)),
    "block32x32": ({"block_sizes": {-1: 32, -2: 32}}, (64, 256)),
}


def _reference(x, batches, num_bits, mode, granularity):
    """The float64 reference for ``x`` with amax from ``batches`` (running max/min over them)."""
    axis, block_sizes = granularity.get("axis"), granularity.get("block_sizes")
    if mode == "asym":
        amax = torch.stack([group_reduce(b, "max", axis, block_sizes) for b in batches]).amax(0)
        amin = torch.stack([group_reduce(b, "min", axis, block_sizes) for b in batches]).amin(0)
        return int_asym_reference(x, amin, amax, num_bits)
    amax = torch.stack([group_reduce(b, "absmax", axis, block_sizes) for b in batches]).amax(0)
    return int_reference(x, amax, num_bits, **MODES[mode])


def _run(num_bits, mode, granularity_name, calibrated, seed):
    granularity, shape = GRANULARITIES[granularity_name]
    generator = torch.Generator().manual_seed(seed)
    x = random_with_outliers(shape, generator)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=num_bits, **MODES[mode], **granularity))
    batches = [x]
    if calibrated:
        batches = [random_with_outliers(shape, generator) for _ in range(3)]
        calibrate_quantizer(quantizer, *batches)
        assert quantizer.amax is not None
    else:
        assert quantizer.amax is None
    return quantizer(x), _reference(x, batches, num_bits, mode, granularity)


@pytest.mark.parametrize("calibrated", [False, True], ids=["dynamic", "calibrated"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("num_bits", range(2, 9))
@pytest.mark.parametrize("granularity_name", ["per-tensor", "axis0"])
def test_every_bit_width(num_bits, mode, granularity_name, calibrated):
    actual, reference = _run(num_bits, mode, granularity_name, calibrated, seed=num_bits)
    assert_matches(actual, reference)


@pytest.mark.parametrize("calibrated", [False, True], ids=["dynamic", "calibrated"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("granularity_name", list(GRANULARITIES))
def test_every_granularity(num_bits, mode, granularity_name, calibrated):
    actual, reference = _run(num_bits, mode, granularity_name, calibrated, seed=100 + num_bits)
    assert_matches(actual, reference)


def test_calibrated_amax_is_the_running_max_and_clamps():
    generator = torch.Generator().manual_seed(1)
    batches = [random_with_outliers((16, 64), generator) for _ in range(3)]
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=0))
    calibrate_quantizer(quantizer, *batches)
    expected = torch.stack([b.abs().amax(dim=1) for b in batches]).amax(0)
    assert torch.equal(quantizer.amax.reshape(-1), expected)
    beyond = batches[0] + torch.where(batches[0] < 0, -2.0, 2.0) * expected[:, None]  # |beyond| > amax
    out = quantizer(beyond)
    # signed int8 clamps to codes [-128, 127]: [-128/127 * amax, amax]
    clamped = torch.where(beyond > 0, 1.0, -128 / 127) * expected[:, None]
    assert torch.allclose(out, clamped, rtol=2**-21)


@pytest.mark.parametrize("mode", ["signed", "asym"])
def test_pre_quant_scale_multiplies_before_quantizing(mode):
    generator = torch.Generator().manual_seed(2)
    x = random_with_outliers((32, 64), generator)
    scale = torch.rand(64, generator=generator) * 3 + 0.25
    config = QuantizerAttributeConfig(num_bits=4, axis=0, **MODES[mode])

    dynamic = TensorQuantizer(config)
    dynamic.pre_quant_scale = scale
    assert_matches(dynamic(x), _reference(x * scale, [x * scale], 4, mode, {"axis": 0}))

    calibrated = TensorQuantizer(config)
    calibrated.pre_quant_scale = scale
    calibration = random_with_outliers((32, 64), generator)
    calibrate_quantizer(calibrated, calibration)  # statistics are of the scaled input
    assert_matches(calibrated(x), _reference(x * scale, [calibration * scale], 4, mode, {"axis": 0}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_keeps_dtype(dtype):
    """Math in float32, result rounded once to the input dtype: within half an ulp of that dtype."""
    generator = torch.Generator().manual_seed(3)
    x = random_with_outliers((8, 64), generator).to(dtype)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=0))
    out = quantizer(x)
    assert out.dtype == dtype
    reference = int_reference(x.float(), group_reduce(x.float(), "absmax", 0), 8)
    allowed = torch.where(reference.ambiguous, reference.step, 0.0) + torch.finfo(dtype).eps * reference.values.abs()
    assert ((out.double() - reference.values).abs() <= allowed).all()


@pytest.mark.parametrize("mode, low_code", [("signed", -128), ("narrow", -127), ("unsigned", 0)])
def test_code_range_at_the_clamp(mode, low_code):
    """Below -amax the code range decides: signed int8 reaches -128/127 amax, narrow -amax, unsigned 0."""
    amax = torch.tensor(2.0)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, **MODES[mode]))
    quantizer.amax = amax
    out = quantizer(torch.tensor([-5.0, 5.0]))
    qmax = 255 if mode == "unsigned" else 127
    assert torch.allclose(out.double(), torch.tensor([low_code * 2.0 / qmax, 2.0], dtype=torch.float64), rtol=2**-21)
