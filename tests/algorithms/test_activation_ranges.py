"""Analytic input ranges (lowbit.algorithms.activation_ranges) against max |x * p / s| computed in float64."""

import logging

import pytest
import torch
from torch import nn

import lowbit.convert as convert
from lowbit.algorithms.activation_ranges import InputRanges, channel_maxima, is_analytic
from lowbit.quantizer import collecting_statistics
from lowbit.structure import quantizable_weights


def quantized_linears(input_cfg, count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    linears = nn.ModuleList(nn.Linear(16, 8) for _ in range(count))
    with torch.no_grad():
        for parameter in linears.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    convert.quantize(linears, {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0},
                                             "*input_quantizer": input_cfg}, "algorithm": None})
    return linears


def batches_with_outliers(count=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, 5, 16, generator=generator) for _ in range(count)]
    batches[1][0, 2, 4] = -40.0  # an outlier in one channel of one batch
    return batches


def test_channel_maxima_matches_float64():
    x = batches_with_outliers()[1]
    expected = x.double().abs().reshape(-1, 16).amax(dim=0)
    torch.testing.assert_close(channel_maxima(x).double(), expected, rtol=0, atol=0)


NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


@pytest.mark.parametrize("input_cfg", [{"num_bits": 8}, NVFP4], ids=["int8", "nvfp4"])
def test_amax_is_max_calibration_of_the_scaled_effective_input(input_cfg):
    """The amax follows max |x * p / s| (NVFP4: its per-tensor global amax), and equals what the quantizer's
    own max calibration of the scaled inputs gives."""
    linears = quantized_linears(input_cfg)
    generator = torch.Generator().manual_seed(2)
    prior = torch.rand(16, generator=generator) + 0.5  # a pre_quant_scale already in place on linear 1
    linears[1].input_quantizer.pre_quant_scale = prior
    records = list(quantizable_weights(linears).values())
    ranges = InputRanges(records)
    batches = batches_with_outliers()
    with torch.no_grad(), ranges.recording():
        for x in batches:
            for linear in linears:
                linear(x)
    scale = torch.rand(16, generator=generator) * 3 + 0.25
    ranges.rescale([records[0], records[1]], scale)  # linear 2 keeps its input
    ranges.apply()

    x64 = torch.cat([x.reshape(-1, 16) for x in batches]).double()
    expected = [(x64 / scale.double()).abs().amax(), (x64 * prior.double() / scale.double()).abs().amax(),
                x64.abs().amax()]
    for linear, amax in zip(linears, expected, strict=True):
        assert linear.input_quantizer.amax.numel() == 1
        torch.testing.assert_close(linear.input_quantizer.amax.double().reshape(()), amax, rtol=1e-6, atol=0)
    calibrated = quantized_linears(input_cfg)[0].input_quantizer
    with torch.no_grad(), collecting_statistics([calibrated]):
        for x in batches:
            calibrated(x / scale)
    torch.testing.assert_close(calibrated.amax.reshape(()), linears[0].input_quantizer.amax.reshape(()),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("input_cfg", [
    {"num_bits": 8, "axis": -1},  # per channel
    {"num_bits": 8, "asymmetric": True},
    {"num_bits": 8, "block_sizes": {-1: 16, "type": "dynamic"}},
    {"num_bits": 8, "calibrator": {"method": "percentile", "percentile": 99.9}},
    {"num_bits": 8, "enable": False},
    {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},  # MXFP4: no amax
])
def test_only_static_symmetric_per_tensor_max_quantizers_are_analytic(input_cfg):
    linears = quantized_linears(input_cfg, count=1)
    assert not is_analytic(linears[0].input_quantizer)
    assert InputRanges(quantizable_weights(linears).values()).linears == []
    assert is_analytic(quantized_linears({"num_bits": 8}, count=1)[0].input_quantizer)
    assert is_analytic(quantized_linears(NVFP4, count=1)[0].input_quantizer)


def test_a_linear_no_call_reached_keeps_its_amax_and_is_reported(caplog):
    linears = quantized_linears({"num_bits": 8}, count=2)
    ranges = InputRanges(quantizable_weights(linears).values())
    with torch.no_grad(), ranges.recording():
        linears[0](batches_with_outliers()[0])
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        ranges.apply()
    assert linears[0].input_quantizer.amax is not None and linears[1].input_quantizer.amax is None
    assert "1 linear(s) saw no calibration data" in caplog.text
