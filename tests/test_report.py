"""lowbit.report: packed weight sizes against byte counts written out by hand, and the measurement rows."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.report import Measurement, measure, packed_weight_bytes, time_quantize

OUT, IN = 64, 256  # one Linear(IN, OUT): weight (OUT, IN), bias (OUT,)
WEIGHTS = OUT * IN


def _model() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 8))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        model[0].weight[3, 5] = 40.0  # an outlier
    return model


def _weight_only(weight_attributes) -> dict:
    return {"quant_cfg": {"0.weight_quantizer": weight_attributes, "default": {"enable": False}}, "algorithm": "max"}


# Expected bytes of the first Linear's packed weight, spelled out: elements, then scales.
CASES = {
    "int8 per-channel": ({"num_bits": 8, "axis": 0}, WEIGHTS + OUT * 2),
    "int8 per-tensor": ({"num_bits": 8, "axis": None}, WEIGHTS + 4),
    "fp8 per-tensor": ({"num_bits": (4, 3), "axis": None}, WEIGHTS + 4),
    "int4 g128": ({"num_bits": 4, "block_sizes": {-1: 128}}, WEIGHTS // 2 + OUT * (IN // 128) * 2),
    "int4 g128 fp32 scales": ({"num_bits": 4, "block_sizes": {-1: 128}, "trt_high_precision_dtype": "Float"},
                              WEIGHTS // 2 + OUT * (IN // 128) * 4),
    "int4 g64 asymmetric": ({"num_bits": 4, "block_sizes": {-1: 64}, "asymmetric": True},
                            WEIGHTS // 2 + OUT * (IN // 64) * 2 + OUT * (IN // 64) // 2),
    "nvfp4": ({"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}},
              WEIGHTS // 2 + OUT * (IN // 16) + 4),
    "mxfp4": ({"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},
              WEIGHTS // 2 + OUT * (IN // 32)),
    "mxfp8": ({"num_bits": (4, 3), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},
              WEIGHTS + OUT * (IN // 32)),
    "w4a8 sequence": ([{"num_bits": 4, "block_sizes": {-1: 128}}, {"num_bits": (4, 3), "axis": None}],
                      WEIGHTS // 2 + OUT * (IN // 128) * 2 + 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_packed_weight_bytes_matches_hand_count(name):
    attributes, first_weight_bytes = CASES[name]
    model = lowbit.quantize(_model(), _weight_only(attributes))
    others = (OUT + OUT * 8 + 8) * 2  # bias, second Linear and its bias at 16 bits
    assert packed_weight_bytes(model) == first_weight_bytes + others


def test_unquantized_and_disabled_weights_count_at_high_precision():
    model = _model()
    params = sum(p.numel() for p in model.parameters())
    assert packed_weight_bytes(model) == 2 * params
    assert packed_weight_bytes(model, high_precision_bytes=4) == 4 * params
    quantized = lowbit.quantize(_model(), _weight_only({"num_bits": 8, "axis": 0}))
    lowbit.disable_quantizer(quantized, "*weight_quantizer")
    assert packed_weight_bytes(quantized) == 2 * params


def test_presets_rank_by_size():
    sizes = {name: packed_weight_bytes(lowbit.quantize(_model(), _weight_only(CASES[name][0])))
             for name in ("fp8 per-tensor", "int8 per-channel", "nvfp4", "int4 g128")}
    assert sizes["int4 g128"] < sizes["nvfp4"] < sizes["int8 per-channel"] < 2 * WEIGHTS


def test_packed_weight_bytes_rejects_bad_high_precision_bytes():
    with pytest.raises(ValueError, match="high_precision_bytes=3"):
        packed_weight_bytes(_model(), high_precision_bytes=3)


def test_measurement_row_deltas():
    baseline = Measurement("none", "original", perplexity=20.0)
    row = Measurement("lowbit", "X", perplexity=21.0, weight_bytes=10, seconds=1.0).as_row(baseline)
    assert row["delta"] == pytest.approx(1.0) and row["delta_pct"] == pytest.approx(5.0)
    failed = Measurement("peer", "Y", error="boom").as_row(baseline)
    assert failed["delta"] is None and failed["delta_pct"] is None


def test_measure_copies_the_model_and_records_failures():
    model = _model()
    before = model[0].weight.detach().clone()

    def scale_weights(candidate):
        with torch.no_grad():
            candidate[0].weight.mul_(2)
        return candidate

    def weight_sum(candidate):
        return float(candidate[0].weight.detach().abs().sum())

    result = measure("lib", "double", model, scale_weights, weight_sum, lambda m: 7)
    assert torch.equal(model[0].weight, before)  # the original is untouched
    assert result.perplexity == pytest.approx(2 * float(before.abs().sum()), rel=1e-6)
    assert result.weight_bytes == 7 and result.seconds >= 0 and result.error is None

    def fail(candidate):
        raise RuntimeError("needs CUDA\nsecond line")

    failed = measure("lib", "cuda-only", model, fail, lambda m: 0.0, lambda m: 0)
    assert failed.error == "RuntimeError: needs CUDA" and failed.perplexity is None


def test_time_quantize_copies_before_timing():
    model = _model()
    quantized, seconds, cpu_seconds = time_quantize(model, lambda candidate: candidate)
    assert quantized is not model and torch.equal(quantized[0].weight, model[0].weight)
    assert seconds >= 0 and cpu_seconds >= 0
