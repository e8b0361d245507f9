"""AWQ searches against brute force over the same grids, written here in float64."""

import pytest
import torch

from lowbit.calib.awq import alpha_grid, awq_scale, clip_ratios, search_awq_scale, search_clip_amax

QMAX = 7
GROUP = 8


def int4_groups(weight, amax=None):
    """Symmetric int4 per (row, group of 8 columns); amax (out, groups) or the group max."""
    out, columns = weight.shape
    slabs = weight.reshape(out, columns // GROUP, GROUP)
    amax = slabs.abs().amax(-1) if amax is None else amax
    scale = amax[..., None] / QMAX
    return ((slabs / scale).round().clamp(-QMAX, QMAX) * scale).reshape(out, columns)


def inputs_with_outlier_channels(generator, rows=256, columns=32):
    x = torch.randn(rows, columns, generator=generator)
    x[:, [2, 11, 30]] *= torch.tensor([15.0, 40.0, 8.0])
    return x


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(11)


def test_awq_scale_formula(generator):
    mean = torch.rand(32, generator=generator, dtype=torch.float64) * 5
    mean[4] = 0.0
    for alpha in (0.0, 0.3, 1.0):
        s = (mean**alpha).clamp_min(1e-4)
        expected = s / (s.max() * s.min()).sqrt()
        torch.testing.assert_close(awq_scale(mean, alpha).double(), expected, rtol=1e-6, atol=0)


def test_awq_search_picks_the_brute_force_minimum(generator):
    x = inputs_with_outlier_channels(generator)
    weights = [torch.randn(24, 32, generator=generator), torch.randn(16, 32, generator=generator)]
    mean = x.abs().mean(0)
    alphas = alpha_grid(0.1)
    best_alpha, scale, losses = search_awq_scale(x, weights, [int4_groups, int4_groups], mean, alphas)

    x64 = x.double()
    brute = []
    for alpha in alphas:
        s = (mean.double() ** alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(float((x64 @ (int4_groups(w.double() * s) / s - w.double()).T).square().sum()) for w in weights)
        brute.append(error / (x.shape[0] * 40))
    brute = torch.tensor(brute, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64), brute, rtol=1e-4, atol=0)
    assert best_alpha == alphas[int(brute.argmin())]
    assert best_alpha > 0  # outlier channels make scaling pay
    assert min(losses) < losses[0]  # alpha = 0 is plain rounding
    torch.testing.assert_close(scale, awq_scale(mean, best_alpha))


def test_clip_search_picks_the_brute_force_minimum(generator):
    x = inputs_with_outlier_channels(generator, rows=64)
    weight = torch.randn(12, 32, generator=generator)
    weight[0, 5] = 9.0  # an outlier weight makes clipping pay for its group
    ratios = clip_ratios(0.5, 0.05)
    amax = search_clip_amax(weight, x, GROUP, int4_groups, ratios)

    x64, w64 = x.double(), weight.double()
    base = w64.abs().reshape(12, 4, GROUP).amax(-1)
    errors = []
    for ratio in ratios:
        delta = (int4_groups(w64, base * ratio) - w64).reshape(12, 4, GROUP)
        contribution = torch.einsum("tnk,onk->ton", x64.reshape(-1, 4, GROUP), delta)
        errors.append(contribution.square().mean(0))
    best = torch.stack(errors).argmin(0)
    expected = base * torch.tensor(ratios, dtype=torch.float64)[best]
    torch.testing.assert_close(amax.double(), expected, rtol=1e-6, atol=0)
    assert amax[0, 0] < base[0, 0]


def test_grids_and_their_errors():
    assert clip_ratios(0.5, 0.05) == pytest.approx([1 - 0.05 * i for i in range(11)])
    assert alpha_grid(0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="min_clip_ratio"):
        clip_ratios(0.0, 0.05)
    with pytest.raises(ValueError, match="shrink_step"):
        clip_ratios(0.5, 1.5)
    with pytest.raises(ValueError, match="alpha_step"):
        alpha_grid(0)
