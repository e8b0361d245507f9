"""AutoRound against float64 references written here: the STE fake quantization (forward: the format's own
rounding; backward: the gradients derived by hand), the signed-gradient descent on one linear layer (every
step, the linear decay, the clamps and the best-loss choice, in NumPy), and the layer-wise algorithm (never
worse than round-to-nearest on each block, weights and stored ranges that re-round to the same codes)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.autoround import Rounding, autoround
from lowbit.algorithms.scale_estimation import IntGrid

from .tiny_llama import forward_loop_for


def outlier_data(rows=8, columns=64, tokens=96, seed=0):
    """Weights ``(rows, columns)`` with 3% outliers x8 and inputs ``(tokens, columns)`` with outlier channels."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    w[torch.rand(rows, columns, generator=generator) < 0.03] *= 8
    x = torch.randn(tokens, columns, generator=generator, dtype=torch.float64)
    x[:, torch.randperm(columns, generator=generator)[:3]] *= 20
    return w, x


def reference_forward_and_gradients(w, x, v, alpha, beta, amin0, amax0, bits, asymmetric, group):
    """w_hat, the loss ``mean((x (w_hat - w)^T)^2)`` and its STE gradients in V, alpha, beta (float64 NumPy,
    derived by hand: round's derivative taken as 1, clamp's as 1 inside its range, 0 outside)."""
    rows, columns = w.shape
    wg = w.reshape(rows, -1, group)
    if asymmetric:
        qmax = 2**bits - 1
        low_raw, high_raw = alpha * amin0, beta * amax0
        low, high = np.minimum(low_raw, 0), np.maximum(high_raw, 0)
        d = (high - low) / qmax
        z_raw = np.round(-low / d)
        z = np.clip(z_raw, 0, qmax)
        z_in = (z_raw >= 0) & (z_raw <= qmax)
        c_raw = np.round(wg / d + v) + z
        c = np.clip(c_raw, 0, qmax)
        c_in = (c_raw >= 0) & (c_raw <= qmax)
        w_hat = (c - z) * d
        # d(z)/d(d), d(z)/d(low) and d(c)/d(d), d(c)/d(low) with STE rounding
        dz_dd, dz_dlow = z_in * low / d**2, z_in * (-1 / d)
        dc_dd = c_in * (-wg / d**2 + dz_dd)
        dc_dlow = c_in * dz_dlow
        dwhat_dd = (c - z) + d * (dc_dd - dz_dd)
        dwhat_dlow_direct = d * (dc_dlow - dz_dlow)
        dwhat_dv = d * c_in
    else:
        qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        amax = beta * amax0
        s = qmax / amax
        q_raw = np.round(wg * s + v)
        q = np.clip(q_raw, qmin, qmax)
        q_in = (q_raw >= qmin) & (q_raw <= qmax)
        w_hat = q / s
        dwhat_dv = q_in / s
        dwhat_damax = q / qmax - q_in * wg / amax  # w_hat = q amax / qmax, dq/damax = -w qmax / amax^2
    w_hat = w_hat.reshape(rows, columns)
    error = x @ (w_hat - w).T
    loss = np.mean(error**2)
    grad_what = (2 / error.size * error.T @ x).reshape(rows, -1, group)
    grad_v = grad_what * dwhat_dv
    if asymmetric:
        grad_d = (grad_what * dwhat_dd).sum(-1, keepdims=True)
        grad_low = (grad_what * dwhat_dlow_direct).sum(-1, keepdims=True) - grad_d / qmax
        grad_high = grad_d / qmax
        grad_alpha = grad_low * (low_raw <= 0) * amin0
        grad_beta = grad_high * (high_raw >= 0) * amax0
    else:
        grad_alpha = None
        grad_beta = (grad_what * dwhat_damax).sum(-1, keepdims=True) * amax0
    return w_hat, loss, grad_v, grad_alpha, grad_beta


def reference_autoround(w, x, bits, asymmetric, group, iterations, lr, minmax_lr):
    """Module docstring's steps 1-2 in NumPy: returns the kept w_hat and its loss."""
    wg = w.reshape(w.shape[0], -1, group)
    amin0, amax0 = (wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)) if asymmetric else (
        None, np.abs(wg).max(-1, keepdims=True))
    v, alpha, beta = np.zeros_like(wg), np.ones_like(amax0), np.ones_like(amax0)
    best, best_loss = None, np.inf
    for t in range(iterations + 1):
        w_hat, loss, grad_v, grad_alpha, grad_beta = reference_forward_and_gradients(
            w, x, v, alpha, beta, amin0, amax0, bits, asymmetric, group)
        if loss < best_loss:
            best, best_loss = w_hat, loss
        if t == iterations:
            break
        decay = 1 - t / iterations
        v = np.clip(v - lr * decay * np.sign(grad_v), -0.5, 0.5)
        beta = np.clip(beta - minmax_lr * decay * np.sign(grad_beta), 0, 1)
        if asymmetric:
            alpha = np.clip(alpha - minmax_lr * decay * np.sign(grad_alpha), 0, 1)
    return best, best_loss


@pytest.mark.parametrize("asymmetric", [False, True])
def test_ste_gradients_match_hand_derived_float64(asymmetric):
    w, x = outlier_data(seed=1)
    grid = IntGrid(3, asymmetric=asymmetric)
    rounding = Rounding.start_at(grid, w, grid.own_range(w.reshape(8, -1, 16)), 16)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a point away from the start: offsets, shrunk ranges
        rounding.offset.copy_(torch.rand(rounding.offset.shape, generator=generator, dtype=torch.float64) - 0.5)
        rounding.max_scale.copy_(0.6 + 0.4 * torch.rand(rounding.max_scale.shape, generator=generator,
                                                        dtype=torch.float64))
        if asymmetric:
            rounding.min_scale.copy_(0.6 + 0.4 * torch.rand(rounding.max_scale.shape, generator=generator,
                                                            dtype=torch.float64))
    w_hat = rounding.quantized()
    loss = (x @ (w_hat - w).T).square().mean()
    tensors = [rounding.offset, rounding.max_scale] + ([rounding.min_scale] if asymmetric else [])
    gradients = torch.autograd.grad(loss, tensors)
    amin0, amax0 = (None if b is None else b.numpy() for b in rounding.start)
    ref = reference_forward_and_gradients(
        w.numpy(), x.numpy(), rounding.offset.detach().numpy(),
        None if not asymmetric else rounding.min_scale.detach().numpy(), rounding.max_scale.detach().numpy(),
        amin0, amax0, 3, asymmetric, 16)
    np.testing.assert_allclose(w_hat.detach().numpy(), ref[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(float(loss.detach()), ref[1], rtol=1e-12)
    np.testing.assert_allclose(gradients[0].numpy(), ref[2], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gradients[1].numpy(), ref[4], rtol=1e-9, atol=1e-12)
    if asymmetric:
        np.testing.assert_allclose(gradients[2].numpy(), ref[3], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_rounding_start_is_the_formats_round_to_nearest(asymmetric):
    w, _ = outlier_data(16, 256, seed=3)
    grid = IntGrid(4, asymmetric=asymmetric)
    groups = w.float().reshape(16, 2, 128)
    rounding = Rounding.start_at(grid, w.float(), grid.own_range(groups), 128)
    torch.testing.assert_close(rounding.quantized().detach(), grid.fake_quant(groups, *grid.own_range(groups))
                               .reshape(16, 256), rtol=0, atol=0)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_signed_gradient_descent_matches_float64_reference(asymmetric):
    w, x = outlier_data(seed=4)
    grid = IntGrid(3, asymmetric=asymmetric)
    rounding = Rounding.start_at(grid, w, grid.own_range(w.reshape(8, -1, 16)), 16)
    iterations, lr = 12, 0.04
    best, loss = autoround({"linear": rounding}, lambda q, t: (x @ (q["linear"] - w).T).square().mean(),
                           iterations=iterations, lr=lr, minmax_lr=lr)
    ref_w_hat, ref_loss = reference_autoround(w.numpy(), x.numpy(), 3, asymmetric, 16, iterations, lr, lr)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
    np.testing.assert_allclose(best["linear"][0].numpy(), ref_w_hat, rtol=0, atol=1e-12)
    rtn = (x @ (grid.fake_quant(w.reshape(8, -1, 16), *grid.own_range(w.reshape(8, -1, 16))).reshape(8, -1) - w).T)
    assert loss < 0.8 * float(rtn.square().mean())  # the descent found something: the reference agrees


class TwoBlocks(nn.Module):
    """A stack of two blocks (linear, GELU, linear) the layer-wise runner walks."""

    def __init__(self, width, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                    for _ in range(2))
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def int_config(asymmetric):
    config = lowbit.get_preset("INT3_BLOCKWISE_WEIGHT_ONLY_CFG" if asymmetric else "INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: 32, "type": "static"}
    return config


@pytest.mark.parametrize("asymmetric", [False, True])
def test_autoround_never_worse_than_rtn_per_block_and_stores_its_grid(asymmetric):
    _, x = outlier_data(64, 64, tokens=128, seed=5)
    batches = [x.float().reshape(2, 64, 64)]
    model = TwoBlocks(64, seed=6)
    config = {**int_config(asymmetric), "algorithm": {"method": "autoround", "iterations": 30}}
    quantized = lowbit.quantize(copy.deepcopy(model), int_config(asymmetric), forward_loop_for(batches))
    tuned = lowbit.quantize(copy.deepcopy(model), config, forward_loop_for(batches))
    for linear in (module for module in tuned.modules() if isinstance(module, nn.Linear)):
        # the stored weight is on the stored grid: the format re-rounds it to itself
        torch.testing.assert_close(linear.weight_quantizer(linear.weight).detach(), linear.weight.detach(),
                                   rtol=0, atol=0)
    with torch.no_grad():
        reference, rtn_out, tuned_out = (m(batches[0]) for m in (model, quantized, tuned))
    assert (tuned_out - reference).square().mean() < 0.9 * (rtn_out - reference).square().mean()


def test_autoround_report_never_worse_than_rtn():
    from lowbit.algorithms.registry import run_algorithm

    _, x = outlier_data(64, 64, tokens=128, seed=7)
    batches = [x.float().reshape(2, 64, 64)]
    model = lowbit.quantize(TwoBlocks(64, seed=8), int_config(True))
    report = run_algorithm("autoround", model, forward_loop_for(batches), {"iterations": 20})
    for entry in report:
        assert entry.mse_after <= entry.mse_max * (1 + 1e-5), entry
    assert sum(e.mse_after for e in report) < 0.9 * sum(e.mse_max for e in report)


def test_autoround_errors_name_the_problem():
    model = TwoBlocks(64, seed=9)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"layers\.0\.0\.weight_quantizer"):
        lowbit.quantize(model, {**lowbit.get_preset("W4A16_NVFP4_CFG"), "algorithm": "autoround"},
                        forward_loop_for([torch.randn(1, 4, 64)]))
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="lr=0"):
        lowbit.parse_config({**int_config(False), "algorithm": {"method": "autoround", "lr": 0.0}})
    with pytest.raises(ValueError, match="iterations=0"):
        lowbit.parse_config({**int_config(False), "algorithm": {"method": "autoround", "iterations": 0}})
