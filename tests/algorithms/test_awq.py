"""AWQ searches against brute force over the same grids, written here in float64."""

import pytest
import torch

from lowbit.algorithms.awq import (
    alpha_grid,
    awq_scale,
    clip_ratios,
    normalised_weight_mean,
    search_awq_scale,
    search_clip_amax,
)

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


def reference_scale(x_mean, alpha, w_mean=None):
    """ModelOpt awq_lite's scale in float64: x^a / (w^(1-a) + tiny), clamped to [1e-4, 1e4], normalised."""
    s = x_mean.double() ** alpha
    if w_mean is not None:
        s = s / (w_mean.double() ** (1 - alpha) + torch.finfo(torch.float32).tiny)
    s = s.clamp(1e-4, 1e4)
    return s / (s.max() * s.min()).sqrt()



def brute_force_losses(x, weights, x_mean, alphas, w_mean) -> dict:
    """float64 mean squared output error of INT4 g32 weights scaled by each candidate (None: no scaling)."""
    x64 = x.double()
    candidates = {None: torch.ones(x.shape[1], dtype=torch.float64)}
    candidates.update({alpha: reference_scale(x_mean, alpha, w_mean) for alpha in alphas})
    brute = {}
    for alpha, s in candidates.items():
        error = sum(float((x64 @ (int4_groups(w.double() * s) / s - w.double()).T).square().sum()) for w in weights)
        brute[alpha] = error / (x.shape[0] * sum(w.shape[0] for w in weights))
    return brute

def test_awq_scale_formula(generator):
    mean = torch.rand(32, generator=generator, dtype=torch.float64) * 5
    mean[4] = 0.0
    w_mean = torch.rand(32, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    for alpha in (0.0, 0.3, 1.0):
        torch.testing.assert_close(awq_scale(mean, alpha).double(), reference_scale(mean, alpha), rtol=1e-6, atol=0)
        torch.testing.assert_close(awq_scale(mean, alpha, w_mean).double(), reference_scale(mean, alpha, w_mean),
                                   rtol=1e-5, atol=0)


def test_normalised_weight_mean_equals_float64_loop(generator):
    weights = [torch.randn(6, 16, generator=generator), torch.randn(3, 16, generator=generator) * 50]
    weights[0][2, 5] = 30.0  # an outlier dominates its group only
    expected = torch.zeros(16, dtype=torch.float64)
    rows = [row.double() for w in weights for row in w]
    for row in rows:
        for start in range(0, 16, 8):
            group = row[start : start + 8].abs()
            expected[start : start + 8] += group / group.max()
    expected /= len(rows)
    torch.testing.assert_close(normalised_weight_mean(weights, 8).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("with_weight_mean", [False, True])
def test_awq_search_picks_the_brute_force_minimum(generator, with_weight_mean):
    x = inputs_with_outlier_channels(generator)
    weights = [torch.randn(24, 32, generator=generator), torch.randn(16, 32, generator=generator)]
    mean = x.abs().mean(0)
    w_mean = normalised_weight_mean(weights, GROUP) if with_weight_mean else None
    alphas = alpha_grid(0.1)
    best_alpha, scale, losses = search_awq_scale(x.T @ x, x.shape[0], weights, [int4_groups, int4_groups], mean,
                                                 alphas, w_mean)

    brute = brute_force_losses(x, weights, mean, alphas, w_mean)
    assert list(losses) == list(brute)
    torch.testing.assert_close(torch.tensor(list(losses.values()), dtype=torch.float64),
                               torch.tensor(list(brute.values()), dtype=torch.float64), rtol=1e-4, atol=0)
    assert best_alpha == min(brute, key=brute.get)
    assert best_alpha is not None  # outlier channels make scaling pay
    assert losses[best_alpha] < losses[None]  # the identity is plain rounding
    torch.testing.assert_close(scale, awq_scale(mean, best_alpha, w_mean))


def test_awq_search_keeps_the_identity_when_no_scale_helps(generator):
    x = torch.randn(64, 32, generator=generator)
    weights = [torch.randn(8, 32, generator=generator)]
    mean = x.abs().mean(0)
    alpha, scale, losses = search_awq_scale(x.T @ x, x.shape[0], weights, [lambda w: w], mean, alpha_grid(0.5))
    assert alpha is None and torch.equal(scale, torch.ones(32))  # lossless "quantizer": all tie at 0
    assert set(losses) == {None, 0.0, 0.5, 1.0}


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


def test_awq_lite_scales_the_output_head_from_its_float_inputs():
    """With lm_head's weight quantizer on, awq_lite searches it too (as ModelOpt's awq_lite does), on the float
    model's final-norm outputs: its scale is the brute-force best (float64, written here) of the identity and
    ModelOpt's formula over the alpha grid, and its output error is at most max calibration's."""
    import copy

    from lowbit import quantize
    from lowbit.presets import get_preset

    from .tiny_llama import forward_loop_for, tiny_llama

    model = tiny_llama(seed=3)
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 96, (2, 12), generator=generator) for _ in range(2)]
    config = get_preset("INT4_AWQ_CFG")
    config["quant_cfg"].pop("*lm_head*")
    config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: 16, "type": "static"}
    config["algorithm"] = {"method": "awq_lite", "alpha_step": 0.25, "scale_per_linear": True}
    head = model.lm_head.weight.detach().double().clone()
    inputs = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    x = torch.cat(inputs).reshape(-1, 64).double()
    quantized = quantize(copy.deepcopy(model), config, forward_loop_for(batches))

    def int4(weight):  # symmetric INT4 per group of 16 columns, max of the group
        slabs = weight.reshape(weight.shape[0], -1, 16)
        scale = slabs.abs().amax(-1, keepdim=True) / 7
        return ((slabs / scale).round().clamp(-7, 7) * scale).reshape(weight.shape)

    def error(scale):
        return ((x @ (int4(head * scale) / scale - head).T) ** 2).sum().item()

    slabs = head.abs().reshape(head.shape[0], -1, 16)
    w_mean = (slabs / slabs.amax(-1, keepdim=True)).reshape(head.shape).mean(0)
    candidates = [torch.ones(64, dtype=torch.float64)]
    candidates += [reference_scale(x.abs().mean(0), alpha, w_mean) for alpha in (0.0, 0.25, 0.5, 0.75, 1.0)]
    best = min(candidates, key=error)
    pre_quant_scale = quantized.lm_head.input_quantizer.pre_quant_scale
    assert pre_quant_scale is not None
    torch.testing.assert_close(pre_quant_scale.double(), 1 / best, rtol=1e-4, atol=0)
    assert error(best) <= error(candidates[0])


def test_awq_search_without_identity_picks_the_best_alpha_where_plain_rounding_wins():
    generator = torch.Generator().manual_seed(35)  # a draw where plain rounding beats every alpha by ~10 %
    x = torch.randn(256, 32, generator=generator)  # no outlier channels
    weights = [torch.randn(24, 32, generator=generator)]
    mean = x.abs().mean(0)
    w_mean = normalised_weight_mean(weights, GROUP)
    alphas = alpha_grid(0.1)
    brute = brute_force_losses(x, weights, mean, alphas, w_mean)
    assert min(brute, key=brute.get) is None  # the case this test is about

    best_alpha, scale, losses = search_awq_scale(x.T @ x, x.shape[0], weights, [int4_groups], mean, alphas, w_mean,
                                                 identity=False)
    scaled = {alpha: loss for alpha, loss in brute.items() if alpha is not None}
    assert list(losses) == list(scaled)  # ModelOpt's grid: the alphas only
    torch.testing.assert_close(torch.tensor(list(losses.values()), dtype=torch.float64),
                               torch.tensor(list(scaled.values()), dtype=torch.float64), rtol=1e-4, atol=0)
    assert best_alpha == min(scaled, key=scaled.get)
    torch.testing.assert_close(scale.double(), reference_scale(mean, best_alpha, w_mean), rtol=1e-5, atol=0)
    with_identity = search_awq_scale(x.T @ x, x.shape[0], weights, [int4_groups], mean, alphas, w_mean)
    assert with_identity[0] is None


def test_identity_option_is_checked_at_the_door():
    from lowbit.algorithms.registry import check_options

    assert check_options("awq_lite", {})["identity"] is True
    assert check_options("awq_full", {"identity": False})["identity"] is False
    with pytest.raises((TypeError, ValueError), match="identity"):
        check_options("awq_lite", {"identity": 1})
