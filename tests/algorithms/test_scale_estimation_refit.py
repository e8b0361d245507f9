"""Scale estimation's refit in its groups-first layout: ``w`` ``(n, 1, rows, g)`` against ranges with a start
axis ``(n, starts, rows, 1)``, each (group, start, row) checked against the float64 least squares written here."""

import torch

from lowbit.algorithms.scale_estimation import IntGrid, refit

GROUP = 8


def _problem(generator, groups=3, starts=2, rows=4):
    x = torch.randn(256, groups * GROUP, generator=generator)
    x[:, 2] *= 15.0  # an outlier channel
    blocks = torch.stack([x[:, k * GROUP : (k + 1) * GROUP].T @ x[:, k * GROUP : (k + 1) * GROUP] / 256
                          for k in range(groups)])
    w = torch.randn(groups, 1, rows, GROUP, generator=generator) * 0.05 + 0.01
    w[1, 0, 2, 5] = 0.7
    shrink = torch.tensor([1.0, 0.8])[:starts].reshape(1, starts, 1, 1)
    return w, blocks, shrink


def _asym_codes(w, amin, amax):
    low, high = amin.clamp(max=0), amax.clamp(min=0)
    step = (high - low) / 15
    return torch.clamp(torch.round(w / step) + torch.clamp(torch.round(-low / step), 0, 15), 0, 15)


def _inner(a, blocks, b):
    return torch.einsum("nsrg,ngh,nsrh->nsr", a, blocks, b)


def test_asymmetric_refit_is_the_two_step_least_squares_fit():
    generator = torch.Generator().manual_seed(11)
    w, blocks, shrink = _problem(generator)
    amin, amax = w.amin(-1, keepdim=True) * shrink, w.amax(-1, keepdim=True) * shrink
    candidates = refit(IntGrid(4, asymmetric=True), w, blocks, amin, amax)

    w64, h64 = w.double().expand(-1, 2, -1, -1), blocks.double()
    c = _asym_codes(w.double(), amin.double(), amax.double())
    ones = torch.ones_like(c)
    normal = torch.stack([torch.stack([_inner(c, h64, c), _inner(c, h64, ones)], -1),
                          torch.stack([_inner(ones, h64, c), _inner(ones, h64, ones)], -1)], -2)
    rhs = torch.stack([_inner(c, h64, w64), _inner(ones, h64, w64)], -1)
    step, offset = torch.linalg.solve(normal, rhs).unbind(-1)
    zero = torch.clamp(torch.round(-offset / step), 0, 15)[..., None]
    step = (_inner(w64, h64, c - zero) / _inner(c - zero, h64, c - zero))[..., None]
    assert len(candidates) == 3
    for (low, high), shift in zip(candidates, (0, -1, 1), strict=True):
        shifted = torch.clamp(zero + shift, 0, 15)
        assert low.shape == (3, 2, 4, 1)
        torch.testing.assert_close(low.double(), -shifted * step, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(high.double(), (15 - shifted) * step, rtol=1e-4, atol=1e-7)


def test_symmetric_refit_per_group_start_and_row():
    generator = torch.Generator().manual_seed(12)
    w, blocks, shrink = _problem(generator)
    amax = w.abs().amax(-1, keepdim=True) * shrink
    [(_, fitted)] = refit(IntGrid(4), w, blocks, None, amax)

    w64, h64 = w.double().expand(-1, 2, -1, -1), blocks.double()
    codes = torch.clamp(torch.round(w64 * 7 / amax.double()), -8, 7)
    step = _inner(w64, h64, codes) / _inner(codes, h64, codes)
    torch.testing.assert_close(fitted.double(), (7 * step)[..., None], rtol=1e-5, atol=0)
