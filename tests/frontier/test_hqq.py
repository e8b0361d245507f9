"""HQQ against float64 references written here: the l_p shrinkage, one half-quadratic iteration (codes,
shrunk error, integer zero point update, least-squares step), and the end-to-end algorithm (never worse than
round-to-nearest by HQQ's l1 criterion, the stored range reproducing the fitted grid)."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.calib.hqq import hqq_grid, hqq_step, shrink_lp
from lowbit.calib.scale_estimation import IntGrid


def outlier_weights(rows=16, columns=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    w[torch.rand(rows, columns, generator=generator) < 0.02] *= 8
    return w


def test_shrink_lp_matches_float64_formula():
    x = outlier_weights(4, 64, seed=1)
    beta, p = 10.0, 0.7
    expected = torch.tensor([[0.0 if v == 0 else (1 if v > 0 else -1) * max(abs(v) - abs(v) ** (p - 1) / beta, 0.0)
                              for v in row.tolist()] for row in x], dtype=torch.float64)
    torch.testing.assert_close(shrink_lp(x, beta, p), expected, rtol=1e-12, atol=1e-12)
    assert (shrink_lp(x, beta, p).abs() <= x.abs()).all()


def reference_step(w, step, zero, beta, p, qmax):
    """One asymmetric HQQ iteration per group in float64, group by group with Python scalars."""
    new_steps, new_zeros = [], []
    for group, d, z in zip(w.tolist(), step.flatten().tolist(), zero.flatten().tolist(), strict=True):
        codes = [min(max(round(v / d + z), 0), qmax) for v in group]  # Python round: half to even, as torch
        residual = [v - d * (c - z) for v, c in zip(group, codes, strict=True)]
        shrunk = [0.0 if r == 0 else (1 if r > 0 else -1) * max(abs(r) - abs(r) ** (p - 1) / beta, 0.0)
                  for r in residual]
        target = [v - e for v, e in zip(group, shrunk, strict=True)]
        z = min(max(round(sum(c - t / d for c, t in zip(codes, target, strict=True)) / len(group)), 0), qmax)
        shifted = [c - z for c in codes]
        d = sum(s * t for s, t in zip(shifted, target, strict=True)) / sum(s * s for s in shifted)
        new_steps.append(d)
        new_zeros.append(z)
    return torch.tensor(new_steps, dtype=torch.float64)[:, None], torch.tensor(new_zeros, dtype=torch.float64)[:, None]


def test_hqq_step_matches_float64_reference():
    grid = IntGrid(3, asymmetric=True)
    w = outlier_weights(8, 32, seed=2)
    low, high = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    step = (high - low) / 7
    zero = torch.round(-low / step)
    new_step, new_zero = hqq_step(grid, w, step, zero, beta=10.0, p=0.7)
    ref_step, ref_zero = reference_step(w, step, zero, 10.0, 0.7, 7)
    torch.testing.assert_close(new_zero, ref_zero, rtol=0, atol=0)
    torch.testing.assert_close(new_step, ref_step, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("asymmetric", [True, False])
def test_hqq_grid_never_worse_than_rtn(asymmetric):
    grid = IntGrid(3, asymmetric=asymmetric)
    groups = outlier_weights(32, 256, seed=3).reshape(32, 2, 128)
    start = grid.own_range(groups)
    rtn_error = (groups - grid.fake_quant(groups, *start)).abs().sum(-1)
    amin, amax, error = hqq_grid(grid, groups, start)
    torch.testing.assert_close(error, (groups - grid.fake_quant(groups, amin, amax)).abs().sum(-1))
    assert (error <= rtn_error).all()
    assert error.sum() < 0.97 * rtn_error.sum(), (float(error.sum()), float(rtn_error.sum()))


def int3_model(weight):
    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    return model


def test_hqq_algorithm_stores_its_grid_without_data():
    weight = outlier_weights(24, 256, seed=4).float()
    config = lowbit.get_preset("INT3_BLOCKWISE_WEIGHT_ONLY_CFG")
    rtn = lowbit.quantize(int3_model(weight), copy.deepcopy(config))
    fitted = lowbit.quantize(int3_model(weight), {**config, "algorithm": {"method": "hqq", "iterations": 10}})
    grid = IntGrid(3, asymmetric=True)
    groups = weight.reshape(24, 2, 128)
    amin, amax, error = hqq_grid(grid, groups, grid.own_range(groups), iterations=10)
    quantized = fitted[0].weight_quantizer(fitted[0].weight).detach()
    torch.testing.assert_close(quantized, grid.fake_quant(groups, amin, amax).reshape(24, 256), rtol=1e-6, atol=1e-6)
    rtn_quantized = rtn[0].weight_quantizer(rtn[0].weight).detach()
    assert (weight - quantized).abs().sum() < (weight - rtn_quantized).abs().sum()


def test_hqq_errors_name_the_problem():
    config = lowbit.get_preset("W4A16_NVFP4_CFG")
    with pytest.raises(ValueError, match="0.weight_quantizer"):
        lowbit.quantize(int3_model(outlier_weights(16, 64).float()), {**config, "algorithm": "hqq"})
    with pytest.raises(ValueError, match="lp_norm=1.5"):
        lowbit.parse_config({**lowbit.get_preset("INT3_BLOCKWISE_WEIGHT_ONLY_CFG"),
                             "algorithm": {"method": "hqq", "lp_norm": 1.5}})
