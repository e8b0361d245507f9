"""HQQ against float64 references written here: the l_p shrinkage, one half-quadratic iteration (codes,
shrunk error, integer zero point update, least-squares step), and the end-to-end algorithm (never worse than
round-to-nearest by HQQ's l1 criterion, the stored range reproducing the fitted grid)."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.hqq import hqq_grid, hqq_step, shrink_lp
from lowbit.algorithms.scale_estimation import IntGrid


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


class OneBlock(nn.Module):
    """A stack of one block holding one linear: what GPTQ's layer-by-layer runner walks."""

    def __init__(self, weight):
        super().__init__()
        self.layers = nn.ModuleList([int3_model(weight)])

    def forward(self, x):
        return self.layers[0](x)


def test_gptq_keeps_hqq_grid_as_its_fixed_groups():
    from lowbit.algorithms.gptq import gptq_quantize

    weight = outlier_weights(16, 256, seed=5).float()
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(512, 256, generator=generator) * (1 + 4 * torch.rand(256, generator=generator))
    model = OneBlock(weight)
    config = {**lowbit.get_preset("INT3_BLOCKWISE_WEIGHT_ONLY_CFG"), "algorithm": {"method": "gptq", "hqq": True}}
    config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: 128, "type": "static"}
    lowbit.quantize(model, config, lambda m: m(x[None]))
    grid = IntGrid(3, asymmetric=True)
    groups = weight.reshape(16, 2, 128)
    amin, amax, _ = hqq_grid(grid, groups, grid.own_range(groups))
    linear = model.layers[0][0]
    torch.testing.assert_close(linear.weight_quantizer.amin.reshape(16, 2, 1), amin, rtol=1e-6, atol=1e-7)
    # the codes are GPTQ's on that grid: the same as gptq_quantize given the grid as fixed groups
    hessian = 2 * x.T.double() @ x.double() / x.shape[0]
    bounds = torch.stack([amin, amax])  # (2, out, groups, 1)
    fixed = [bounds[:, :, k:k + 1] for k in range(2)]
    expected = gptq_quantize(weight, hessian.float(), group_amax=None,
                             quantize_column=lambda column, g: grid.fake_quant(column[:, None],
                                                                               *g.reshape(2, -1, 1))[:, 0],
                             group_size=128, fixed_groups=fixed)
    torch.testing.assert_close(linear.weight.detach(), expected.weight, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="hqq=True and scale_estimation"):
        lowbit.parse_config({**config, "algorithm": {"method": "gptq", "hqq": True, "scale_estimation": True}})
