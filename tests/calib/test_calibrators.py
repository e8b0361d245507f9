"""Calibrators against float64 / numpy references written here."""

import math

import numpy as np
import pytest
import torch

from lowbit.calib import (
    EntropyCalibrator,
    MaxCalibrator,
    MseCalibrator,
    PercentileCalibrator,
    make_calibrator,
)
from lowbit.calib.mse import _SystematicRows


def gaussian_with_outliers(generator, shape, scale=1.0, outlier_scale=30.0, outlier_fraction=1e-3):
    x = torch.randn(shape, generator=generator) * scale
    mask = torch.rand(shape, generator=generator) < outlier_fraction
    return torch.where(mask, x * outlier_scale, x)


def int_fake_quant(x, amax, num_bits=8):
    """Symmetric integer fake quant: round(x / amax * qmax) clamped to [-qmax, qmax], times amax / qmax."""
    qmax = 2 ** (num_bits - 1) - 1
    scale = amax / qmax
    return (x / scale).round().clamp(-qmax, qmax) * scale


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


# --- max ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce_dims", [None, (1,), (-1,), (0, 2)])
def test_max_equals_float64_running_max(generator, reduce_dims):
    batches = [gaussian_with_outliers(generator, (12, 5, 16), scale=s) for s in (1.0, 3.0, 0.5)]
    calibrator = MaxCalibrator(reduce_dims)
    for x in batches:
        calibrator.collect(x)
    stacked = torch.stack([x.double().abs() for x in batches])  # (batch, ...)
    if reduce_dims is None:
        expected = stacked.max()
    else:
        dims = tuple(d % 3 + 1 for d in reduce_dims)
        expected = stacked.amax(dim=(0, *dims)).reshape(calibrator.compute_amax().shape)
        assert calibrator.compute_amax().shape == batches[0].abs().amax(dim=reduce_dims, keepdim=True).shape
    assert calibrator.compute_amax().dtype == torch.float32
    torch.testing.assert_close(calibrator.compute_amax().double(), expected, rtol=0, atol=0)


def test_max_rejects_nan_inf_and_shape_changes(generator):
    calibrator = MaxCalibrator((1,))
    assert calibrator.compute_amax() is None
    bad = torch.randn(4, 8, generator=generator)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="MaxCalibrator.*NaN"):
        calibrator.collect(bad)
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="MaxCalibrator"):
        calibrator.collect(bad)
    assert calibrator.compute_amax() is None  # nothing was recorded
    with pytest.raises(TypeError, match="floating-point"):
        calibrator.collect(torch.ones(4, 8, dtype=torch.int32))
    calibrator.collect(torch.randn(4, 8, generator=generator))
    with pytest.raises(ValueError, match="shape changed"):
        calibrator.collect(torch.randn(5, 8, generator=generator))
    with pytest.raises(ValueError, match="reduce_dims"):
        MaxCalibrator((3,)).collect(torch.randn(4, 8, generator=generator))
    calibrator.reset()
    assert calibrator.compute_amax() is None


def test_reduce_dims_validation():
    with pytest.raises(TypeError, match="reduce_dims"):
        MaxCalibrator([1])
    with pytest.raises(ValueError, match="reduce_dims"):
        MaxCalibrator(())


# --- histogram, percentile ------------------------------------------------------------------------------


@pytest.mark.parametrize("percentile", [50.0, 99.0, 99.9, 99.99])
def test_percentile_within_one_bin_of_numpy(generator, percentile):
    batches = [gaussian_with_outliers(generator, (4096,), scale=s) for s in (1.0, 2.5, 7.0)]
    calibrator = PercentileCalibrator(percentile=percentile)
    for x in batches:
        calibrator.collect(x)
    magnitudes = np.abs(torch.cat(batches).double().numpy())
    amax, width = float(calibrator.compute_amax()), calibrator.bin_width
    # the order statistics on either side of numpy's interpolated percentile, one bin width of slack
    lower = np.percentile(magnitudes, percentile, method="lower") - width
    upper = np.percentile(magnitudes, percentile, method="higher") + width
    assert lower <= amax <= upper
    if percentile <= 99.9:  # where the data is dense, the two order statistics are close
        assert abs(amax - np.percentile(magnitudes, percentile)) <= width
    assert calibrator.bin_width <= 2 * magnitudes.max() / 2048  # range at most doubles past the max


def test_histogram_memory_is_bounded_and_rebinning_exact(generator):
    calibrator = PercentileCalibrator()
    batches = []
    for step in range(60):
        x = torch.randn(257, generator=generator) * 1.15**step  # the range keeps growing
        calibrator.collect(x)
        batches.append(x)
        assert calibrator.hist.shape == (2048,)
    magnitudes = torch.cat(batches).double().abs()
    assert int(calibrator.hist.sum()) == magnitudes.numel()
    # the same histogram built directly at the final range, float64
    direct = torch.bincount(
        (magnitudes / calibrator.bin_width).floor().long().clamp(max=2047), minlength=2048
    )
    moved = int((calibrator.hist - direct).abs().sum())
    assert moved <= 4  # only float32 rounding right at a bin edge may differ


def test_percentile_validation():
    for bad in (0, 100.5, -1, "99"):
        with pytest.raises(ValueError, match="percentile"):
            PercentileCalibrator(percentile=bad)
    with pytest.raises(ValueError, match="per-tensor only"):
        PercentileCalibrator(reduce_dims=(0,)).collect(torch.ones(3, 4))
    with pytest.raises(ValueError, match="num_bins"):
        PercentileCalibrator(num_bins=1000)
    assert PercentileCalibrator().compute_amax() is None


# --- entropy ---------------------------------------------------------------------------------------------


def reference_kl(hist, i, num_levels):
    """TensorRT's pseudo-code, with explicit loops: clip at bin i, fold outliers, quantize, expand, KL."""
    hist = [float(h) for h in hist]
    p = hist[:i]
    p[i - 1] += sum(hist[i:])
    q = [0.0] * i
    for level in range(num_levels):
        members = [j for j in range(i) if math.floor(j * num_levels / i) == level]
        nonzero = [j for j in members if hist[j] > 0]
        total = sum(hist[j] for j in members)
        for j in nonzero:
            q[j] = total / len(nonzero)
    p_sum, q_sum = sum(p), sum(q)
    kl = 0.0
    for pj, qj in zip(p, q, strict=True):
        if pj > 0:
            if qj == 0:
                return math.inf
            kl += pj / p_sum * math.log((pj / p_sum) / (qj / q_sum))
    return kl


def test_entropy_threshold_minimises_kl(generator):
    calibrator = EntropyCalibrator(num_bits=8)
    for _ in range(3):
        calibrator.collect(gaussian_with_outliers(generator, (20000,), outlier_fraction=2e-3))
    amax = float(calibrator.compute_amax())
    chosen = round(amax / calibrator.bin_width)
    assert amax < 0.5 * calibrator.range  # outliers are clipped
    hist = calibrator.hist.numpy().astype(np.float64)
    hist[0] = hist[1]  # TensorRT's zero-bin rule, documented in entropy_threshold_bin
    chosen_kl = reference_kl(hist, chosen, 128)
    for other in (128, chosen - 40, chosen - 1, chosen + 1, chosen + 40, 1024, 2048):
        assert chosen_kl <= reference_kl(hist, other, 128) + 1e-12, other


def test_entropy_keeps_the_max_of_uniform_data(generator):
    calibrator = EntropyCalibrator(num_bits=8)
    x = torch.rand(50000, generator=generator) * 2 - 1
    calibrator.collect(x)
    # no outliers: clipping anything only adds divergence, so the threshold is the whole range
    assert float(calibrator.compute_amax()) == pytest.approx(float(x.abs().max()), rel=1e-6)


def test_entropy_validation():
    with pytest.raises(ValueError, match="num_bits"):
        EntropyCalibrator(num_bits=(4, 3))
    with pytest.raises(ValueError, match="per-tensor only"):
        EntropyCalibrator(reduce_dims=(1,)).collect(torch.ones(3, 4))


# --- mse -------------------------------------------------------------------------------------------------


def brute_force_mse_amax(batches, multipliers, reduce_dims, num_bits):
    """float64: amax_max * m for the m with least total squared fake-quant error (per kept channel)."""
    batches = [x.double() for x in batches]
    if reduce_dims is None:
        amax_max = max(x.abs().max() for x in batches)
    else:
        amax_max = torch.stack([x.abs().amax(dim=reduce_dims, keepdim=True) for x in batches]).amax(0)
    errors = []
    for m in multipliers:
        total = 0.0
        for x in batches:
            error = (int_fake_quant(x, amax_max * m, num_bits) - x) ** 2
            total = total + (error.sum() if reduce_dims is None else error.sum(reduce_dims, keepdim=True))
        errors.append(torch.as_tensor(total))
    return amax_max * torch.tensor(multipliers, dtype=torch.float64)[torch.stack(errors).argmin(0)]


@pytest.mark.parametrize("num_bits", [4, 8])
def test_mse_per_tensor_matches_brute_force(generator, num_bits):
    batches = [gaussian_with_outliers(generator, (64, 32), outlier_fraction=5e-3) for _ in range(3)]
    calibrator = MseCalibrator(lambda x, a: int_fake_quant(x, a, num_bits), num_steps=31)
    for x in batches:
        calibrator.collect(x)
    expected = brute_force_mse_amax(batches, calibrator.multipliers.tolist(), None, num_bits)
    torch.testing.assert_close(calibrator.compute_amax().double(), expected, rtol=1e-6, atol=0)
    if num_bits == 4:  # coarse grid: clipping the outliers pays
        assert float(calibrator.compute_amax()) < float(max(x.abs().max() for x in batches))


def test_mse_per_channel_matches_brute_force(generator):
    weight = gaussian_with_outliers(generator, (48, 64), outlier_fraction=1e-2)
    calibrator = make_calibrator(
        {"method": "mse", "num_steps": 61, "start_multiplier": 0.1, "stop_multiplier": 1.6},
        (1,), lambda x, a: int_fake_quant(x, a, 4), 4,
    )
    calibrator.collect(weight)
    expected = brute_force_mse_amax([weight], calibrator.multipliers.tolist(), (1,), 4)
    assert calibrator.compute_amax().shape == (48, 1)
    torch.testing.assert_close(calibrator.compute_amax().double(), expected, rtol=1e-6, atol=0)


def test_mse_inputs_are_bounded():
    calibrator = MseCalibrator(int_fake_quant, reduce_dims=(1,), sample_size=100)
    calibrator.collect(torch.randn(8, 10))
    with pytest.raises(ValueError, match="sample_size"):
        calibrator.collect(torch.randn(8, 10))


def test_systematic_row_sample_is_bounded_and_evenly_spaced():
    sample = _SystematicRows(capacity=3 * 100)
    seen = 0
    for rows in (37, 5, 64, 1, 90, 250, 13) * 3:
        sample.add(torch.arange(seen, seen + rows, dtype=torch.float32)[:, None].expand(rows, 3))
        seen += rows
        kept = torch.cat(sample.rows())[:, 0]
        assert kept.numel() * 3 <= 300
        assert torch.all(kept % sample.stride == 0)  # the rows with global index 0, stride, 2*stride...
        assert kept.numel() == len(range(0, seen, sample.stride))


def test_mse_validation():
    with pytest.raises(TypeError, match="quant_fn"):
        MseCalibrator(None)
    with pytest.raises(ValueError, match="num_steps"):
        MseCalibrator(int_fake_quant, num_steps=0)
    with pytest.raises(ValueError, match="start_multiplier"):
        MseCalibrator(int_fake_quant, start_multiplier=2.0, stop_multiplier=1.0)
    assert MseCalibrator(int_fake_quant).compute_amax() is None


# --- factory ---------------------------------------------------------------------------------------------


def test_make_calibrator_builds_each_method():
    assert isinstance(make_calibrator("max", (0,), None, 8), MaxCalibrator)
    assert make_calibrator({"method": "percentile", "percentile": 99.9}, None, None, 8).percentile == 99.9
    assert make_calibrator("entropy", None, None, 4, unsigned=True).num_levels == 16
    assert isinstance(make_calibrator("mse", None, int_fake_quant, 8), MseCalibrator)


def test_make_calibrator_errors():
    with pytest.raises(ValueError, match=r"allowed: \['entropy', 'max', 'mse', 'percentile'\]"):
        make_calibrator("minmax", None, None, 8)
    with pytest.raises(ValueError, match="unknown options.*percentil"):
        make_calibrator({"method": "percentile", "percentil": 99}, None, None, 8)
    with pytest.raises(ValueError, match="'method'"):
        make_calibrator({"percentile": 99}, None, None, 8)
    with pytest.raises(ValueError, match="quant_fn"):
        make_calibrator("mse", None, None, 8)
    with pytest.raises(TypeError, match="calibrator"):
        make_calibrator(3, None, None, 8)


@pytest.mark.parametrize("method", ["max", "percentile", "entropy", "mse"])
def test_reduce_dims_naming_every_dim_is_per_tensor(generator, method):
    """The quantizer's per-tensor view reduces every dim: same amax as reduce_dims=None, shaped (1, 1, 1)."""
    batches = [gaussian_with_outliers(generator, (6, 10, 16)) for _ in range(2)]
    results = []
    for reduce_dims in (None, (0, 1, 2)):
        calibrator = make_calibrator(method, reduce_dims, int_fake_quant, 8)
        for x in batches:
            calibrator.collect(x)
        results.append(calibrator.compute_amax())
    assert results[0].shape == () and results[1].shape == (1, 1, 1)
    assert torch.equal(results[0].reshape(1, 1, 1), results[1])
