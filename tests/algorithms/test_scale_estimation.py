"""Scale estimation against float64 references written here: the activation-weighted group error, the
integer grids (symmetric -8..7 with scale amax/7, asymmetric 0..15 with a zero point), brute force."""

import pytest
import torch

from lowbit.algorithms.scale_estimation import (
    IntGrid,
    estimate_range,
    hessian_blocks,
    refit,
    start_ratios,
)

GROUP = 8
DENSE_RATIOS = [0.3 + 0.002 * i for i in range(501)]  # 0.3 to 1.3


def sym_reference(w, amax):
    """lowbit's signed int4 in float64: codes clamp(round(w * 7 / amax), -8, 7), w_hat = codes * amax / 7."""
    scale = 7 / amax
    return torch.clamp(torch.round(w * scale), -8, 7) / scale


def asym_reference(w, amin, amax):
    """Unsigned int4 with a zero point in float64 (the range widened to contain 0)."""
    low, high = amin.clamp(max=0), amax.clamp(min=0)
    step = (high - low) / 15
    zero = torch.clamp(torch.round(-low / step), 0, 15)
    return (torch.clamp(torch.round(w / step) + zero, 0, 15) - zero) * step


def error_reference(w, w_hat, blocks):
    """sum_{j,k} d_j H_jk d_k per (row, group), float64."""
    delta = (w - w_hat).double()
    return torch.einsum("rng,ngh,rnh->rn", delta, blocks.double(), delta)


def correlated_inputs(generator, tokens=512, columns=32):
    """Correlated channels plus outlier channels (as real LLM activations)."""
    mixing = torch.eye(columns) + 0.4 * torch.randn(columns, columns, generator=generator) / columns**0.5
    x = torch.randn(tokens, columns, generator=generator) @ mixing
    x[:, [1, columns - 3]] *= torch.tensor([12.0, 30.0])
    return x


def weights_with_outliers(generator, rows=16, columns=32):
    w = torch.randn(rows, columns, generator=generator) * 0.05
    w[rows // 2, 3] = 0.9  # one large weight per group of the first rows
    w[0, columns - 2] = -0.6
    return w


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(5)


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("objective", ["block", "diagonal"])
def test_search_never_increases_the_weighted_error(generator, asymmetric, objective):
    x = correlated_inputs(generator)
    hessian = x.T @ x / x.shape[0]
    exact = hessian_blocks(hessian, GROUP)
    grid = IntGrid(4, asymmetric)
    reference = asym_reference if asymmetric else sym_reference
    for trial in range(3):
        w = weights_with_outliers(generator).reshape(16, -1, GROUP)
        amin, amax = grid.own_range(w)
        start = (amin * (1 - 0.2 * trial) if asymmetric else None, amax * (1 - 0.2 * trial))
        start_error = error_reference(w, reference(w.double(), *[t.double() for t in start if t is not None]), exact)
        best_min, best_max, error = estimate_range(grid, w, hessian_blocks(hessian, GROUP, objective), start,
                                                   start_ratios(0.7, 0.1), steps=4)
        bounds = (best_min.double(), best_max.double()) if asymmetric else (best_max.double(),)
        result_error = error_reference(w, reference(w.double(), *bounds), exact)
        # float32 search vs float64 reference: allow 1e-5 relative per group
        if objective == "block":
            assert torch.all(result_error <= start_error * (1 + 1e-5) + 1e-12)
            torch.testing.assert_close(error.double(), result_error, rtol=1e-4, atol=1e-9)
        assert result_error.sum() < 0.9 * start_error.sum()  # it finds something better, not just no worse


def test_refit_is_the_least_squares_step():
    w = torch.tensor([[[0.11, -0.52, 0.33, 0.07, -0.2, 0.95, -0.61, 0.4]]], dtype=torch.float64)
    blocks = torch.diag_embed(torch.tensor([[1.0, 4.0, 0.5, 2.0, 1.0, 3.0, 0.25, 1.5]], dtype=torch.float64))
    amax = w.abs().amax(-1, keepdim=True)
    [(_, fitted)] = refit(IntGrid(4), w, blocks, None, amax)
    codes = torch.clamp(torch.round(w * 7 / amax), -8, 7)
    energy = blocks.diagonal(dim1=-2, dim2=-1)
    step = (w * codes * energy).sum() / (codes * codes * energy).sum()
    torch.testing.assert_close(fitted.double().flatten(), (7 * step).reshape(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_symmetric_result_equals_brute_force(seed):
    """One group of 8 weights: the exhaustive minimum over amax on a grid of step 2e-5 * max|w|, same
    objective in float64. The search, started from a dense set of ratios (it is a local search: refits
    from each start), must be within 1e-3 (relative) of the grid minimum: its fit is continuous (it
    may beat the grid), and an optimum at a rounding discontinuity is only approached."""
    generator = torch.Generator().manual_seed(seed)
    x = correlated_inputs(generator, columns=GROUP)
    blocks = hessian_blocks(x.T @ x / x.shape[0], GROUP).double()
    w = weights_with_outliers(generator, rows=1, columns=GROUP).reshape(1, 1, GROUP).double()
    top = float(w.abs().max())
    candidates = torch.linspace(0.3 * top, 1.3 * top, 50001, dtype=torch.float64)
    brute = float(error_reference(w.expand(len(candidates), 1, GROUP), sym_reference(w, candidates.reshape(-1, 1, 1)),
                                  blocks).min())
    _, amax, _ = estimate_range(IntGrid(4), w, blocks, IntGrid(4).own_range(w), DENSE_RATIOS, steps=4)
    found = float(error_reference(w, sym_reference(w, amax.double()), blocks))
    assert abs(found - brute) <= 1e-3 * brute


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_asymmetric_result_equals_brute_force(seed):
    """Exhaustive over the zero point (0..15) and the step (grid of 4001 steps per zero point); dense starts
    as in the symmetric test."""
    generator = torch.Generator().manual_seed(seed)
    x = correlated_inputs(generator, columns=GROUP)
    blocks = hessian_blocks(x.T @ x / x.shape[0], GROUP).double()
    w = (weights_with_outliers(generator, rows=1, columns=GROUP) + 0.03).reshape(1, 1, GROUP).double()
    span = float(w.max() - w.min().clamp(max=0))
    steps = torch.linspace(0.4 * span / 15, 1.3 * span / 15, 4001, dtype=torch.float64)
    brute = float("inf")
    for zero in range(16):
        errors = error_reference(w.expand(len(steps), 1, GROUP), asym_reference(
            w, (-zero * steps).reshape(-1, 1, 1), ((15 - zero) * steps).reshape(-1, 1, 1)), blocks)
        brute = min(brute, float(errors.min()))
    grid = IntGrid(4, asymmetric=True)
    amin, amax, _ = estimate_range(grid, w, blocks, grid.own_range(w), DENSE_RATIOS, steps=4)
    found = float(error_reference(w, asym_reference(w, amin.double(), amax.double()), blocks))
    assert abs(found - brute) <= 1e-3 * brute


def test_dead_groups_keep_their_range(generator):
    """A group whose inputs are all zero has no error either way: its range stays as it was."""
    x = correlated_inputs(generator, columns=16)
    x[:, :GROUP] = 0
    w = weights_with_outliers(generator, rows=4, columns=16).reshape(4, 2, GROUP)
    start = IntGrid(4).own_range(w)
    _, amax, error = estimate_range(IntGrid(4), w, hessian_blocks(x.T @ x, GROUP), start, [0.8], steps=3)
    assert torch.equal(amax[:, 0], start[1][:, 0]) and torch.all(error[:, 0] == 0)


def test_option_errors():
    with pytest.raises(ValueError, match="min_ratio=0"):
        start_ratios(0, 0.1)
    with pytest.raises(ValueError, match="ratio_step=1"):
        start_ratios(0.5, 1)
    with pytest.raises(ValueError, match="objective='full'"):
        hessian_blocks(torch.eye(8), 4, "full")


def signed_reference(w, amin, amax):
    """NNCF's signed-scale int4 in float64: step = (|min| if |min| >= max else -max) / 8 of the range widened to
    contain 0, codes clamp(round(w / step), -8, 7)."""
    low, high = amin.clamp(max=0), amax.clamp(min=0)
    step = torch.where(-low >= high, -low, -high) / 8
    return torch.clamp(torch.round(w / step), -8, 7) * step


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_signed_scale_search_never_worse_and_near_brute_force(seed):
    """Signed-scale grids: the search's result is never worse than its start (min/max) and within 1e-3 of the
    exhaustive minimum over the signed step (both signs, grid of 2 x 20001 steps), float64 objective."""
    generator = torch.Generator().manual_seed(seed)
    x = correlated_inputs(generator, columns=GROUP)
    blocks = hessian_blocks(x.T @ x / x.shape[0], GROUP).double()
    w = weights_with_outliers(generator, rows=1, columns=GROUP).reshape(1, 1, GROUP).double()
    top = float(w.abs().max())
    magnitudes = torch.linspace(0.3 * top / 8, 1.3 * top / 8, 20001, dtype=torch.float64)
    brute = float("inf")
    for sign in (1.0, -1.0):
        steps = (sign * magnitudes).reshape(-1, 1, 1)
        w_hat = torch.clamp(torch.round(w / steps), -8, 7) * steps
        brute = min(brute, float(error_reference(w.expand(len(magnitudes), 1, GROUP), w_hat, blocks).min()))
    grid = IntGrid(4, signed_scale=True)
    start = grid.own_range(w)
    start_error = float(error_reference(w, signed_reference(w, *start), blocks))
    amin, amax, _ = estimate_range(grid, w, blocks, start, DENSE_RATIOS, steps=4)
    found = float(error_reference(w, signed_reference(w, amin.double(), amax.double()), blocks))
    assert found <= start_error * (1 + 1e-9)
    assert abs(found - brute) <= 1e-3 * brute
