"""GPTQ on NVFP4 / MX weights (``lowbit.algorithms.gptq_micro``) against a float64 reference written here: the
OBQ-style column loop with the explicit inverse Hessian, each block's scale fixed at its first column from
the block's current weights (or up front, static), the formats' scale and rounding rules written from their
definitions (E2M1 grid, E4M3 rounding of the block scale, E8M0 shared exponent, the E4M3 scale search)."""

import pytest
import torch

import lowbit.convert as convert
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.gptq_micro import MicroScaleGrid
from lowbit.algorithms.gptq_target import InputErrorAccumulator, input_error_target
from lowbit.algorithms.registry import run_algorithm
from lowbit.formats.minifloat import E2M1

from .test_algorithms import quantized
from .test_gptq import correlated_inputs
from .tiny_llama import forward_loop_for, logits

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
E4M3_VALUES = torch.tensor([(m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
                            for e in range(16) for m in range(8)][:127], dtype=torch.float64)  # codes 0..126


def e2m1(x):
    """Nearest E2M1 value, saturating at +-6 (random data: no exact ties, so the tie rule does not matter)."""
    index = (x.abs()[..., None] - E2M1_GRID).abs().argmin(-1)
    return torch.sign(x) * E2M1_GRID[index]


def e4m3_code(s):
    """Code (0..126) of the E4M3 value nearest to positive ``s`` (saturating at 448)."""
    return (s[..., None] - E4M3_VALUES).abs().argmin(-1)


def nvfp4_element(x, block_amax, global_amax):
    """NVFP4 of ``x`` given its block's maximum: g = G / 2688, s = e4m3(a / (6 g)), x_hat = e2m1(x / (s g)) s g."""
    g = global_amax / (6 * 448)
    s = torch.where(block_amax == 0, 1.0, E4M3_VALUES[e4m3_code(block_amax / (6 * g))])
    return e2m1(x / (s * g)) * s * g


def nvfp4_mse_candidates(slab, global_amax):
    """Block maxima (out,): the block's own, then those of the E4M3 scales -3..+4 codes from its default scale."""
    g = global_amax / (6 * 448)
    default = e4m3_code(slab.abs().amax(1) / (6 * g))
    steps = (-3, -2, -1, 1, 2, 3, 4)
    return [slab.abs().amax(1)] + [E4M3_VALUES[(default + step).clamp(1, 126)] * 6 * g for step in steps]


def first_least(candidates, errors):
    """Per row, the candidate with the least error (the first of equals)."""
    choice = torch.stack(errors).argmin(0)  # argmin returns the first minimum
    return torch.stack(candidates).gather(0, choice[None])[0]


def nvfp4_mse_amax(w, inverse, j, block, global_amax):
    """The candidate with the least squared error of the block rounded alone."""
    slab = w[:, j : j + block]
    candidates = nvfp4_mse_candidates(slab, global_amax)
    errors = [(nvfp4_element(slab, c[:, None], global_amax) - slab).square().sum(1) for c in candidates]
    return first_least(candidates, errors)


def nvfp4_loss_amax(w, inverse, j, block, global_amax):
    """The candidate with the least GPTQ loss sum (w_k - q_k)^2 / inverse_kk over the block, each candidate's
    errors pushed onto the block's later columns (a copy of the loop below, run once per candidate)."""
    candidates = nvfp4_mse_candidates(w[:, j : j + block], global_amax)
    errors = []
    for candidate in candidates:
        wc, inv, loss = w.clone(), inverse.clone(), torch.zeros(w.shape[0], dtype=torch.float64)
        for k in range(j, j + block):
            q = nvfp4_element(wc[:, k], candidate, global_amax)
            loss += (wc[:, k] - q).square() / inv[k, k]
            wc -= ((wc[:, k] - q) / inv[k, k])[:, None] * inv[k][None, :]
            inv = inv - inv[:, k : k + 1] @ inv[k : k + 1, :] / inv[k, k]
        errors.append(loss)
    return first_least(candidates, errors)


def mx_element(x, block_amax):
    """MXFP4: e = floor(log2 a) - 2 (E2M1's largest exponent), x_hat = e2m1(x / 2^e) 2^e."""
    scale = 2.0 ** (torch.floor(torch.log2(block_amax)) - 2)
    return e2m1(x / scale) * scale


def reference_micro_gptq(weight, hessian, block, percdamp, element, choose, order=None, static=False):
    w, h = weight.double().clone(), hessian.double().clone()
    columns = w.shape[1]
    h += percdamp * h.diagonal().mean() * torch.eye(columns, dtype=torch.float64)
    inverse = torch.linalg.inv(h)
    fixed = [choose(w, inverse, b) for b in range(0, columns, block)]
    quantized = torch.zeros_like(w)
    for step, j in enumerate(range(columns) if order is None else order):
        if not static and step % block == 0:
            fixed[j // block] = choose(w, inverse, j)  # from the block's current weights
        q = element(w[:, j], fixed[j // block])
        quantized[:, j] = q
        error = (w[:, j] - q) / inverse[j, j]
        w -= error[:, None] * inverse[j][None, :]
        inverse = inverse - inverse[:, j : j + 1] @ inverse[j : j + 1, :] / inverse[j, j]
    return quantized, torch.stack(fixed, 1)


def problem(seed, out=8, columns=64):
    generator = torch.Generator().manual_seed(seed)
    x = correlated_inputs(generator, 400, columns).double()
    weight = torch.randn(out, columns, generator=generator, dtype=torch.float64)
    weight[1, 5] = 9.0  # an outlier weight: its block gets a large scale
    return weight, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("search", ["max", "mse", "loss"])
def test_nvfp4_gptq_equals_float64_reference(search):
    weight, hessian = problem(3)
    global_amax = weight.abs().amax()
    grid = MicroScaleGrid(16, search, global_amax.float(), None)
    result = gptq_quantize(weight, hessian, grid.block_amax, grid.quantize_column, group_size=16, block_size=32,
                           choose_group=grid.block_amax_by_loss if search == "loss" else None)
    choices = {"max": lambda w, inverse, j: w[:, j : j + 16].abs().amax(1),
               "mse": lambda w, inverse, j: nvfp4_mse_amax(w, inverse, j, 16, global_amax),
               "loss": lambda w, inverse, j: nvfp4_loss_amax(w, inverse, j, 16, global_amax)}
    choose = choices[search]

    expected, blocks = reference_micro_gptq(weight, hessian, 16, 0.01,
                                            lambda c, a: nvfp4_element(c, a, global_amax), choose)
    # float32 scales inside lowbit's formats vs float64 here: values agree to float32 rounding, codes exactly
    torch.testing.assert_close(result.weight, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat(result.group_amax, 1).double(), blocks, rtol=1e-6, atol=0)
    if search == "loss":  # the loss ranks the candidates differently from the block's own squared error here
        mse_blocks = reference_micro_gptq(weight, hessian, 16, 0.01, lambda c, a: nvfp4_element(c, a, global_amax),
                                          choices["mse"])[1]
        assert not torch.equal(blocks, mse_blocks)
    rtn = nvfp4_element(weight, weight.reshape(8, 4, 16).abs().amax(-1).repeat_interleave(16, 1), global_amax)
    assert result.loss < float(((weight - rtn) @ hessian * (weight - rtn)).sum() / 2)  # GPTQ's loss beats RTN's


def test_mx_gptq_act_order_static_equals_float64_reference():
    weight, hessian = problem(4)
    order = torch.argsort(hessian.diagonal(), descending=True)
    grid = MicroScaleGrid(32, "max", None, E2M1)
    result = gptq_quantize(weight, hessian, grid.block_amax, grid.quantize_column, group_size=32,
                           act_order=True, static_groups=True)
    expected, blocks = reference_micro_gptq(weight, hessian, 32, 0.01, mx_element,
                                            lambda w, inverse, j: w[:, j : j + 32].abs().amax(1),
                                            order=order.tolist(), static=True)
    torch.testing.assert_close(result.weight, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat(result.group_amax, 1).double(), blocks, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("preset", "options"), [("NVFP4_DEFAULT_CFG", {"block_scales": "mse"}),
                                                 ("NVFP4_DEFAULT_CFG", {"block_scales": "loss"}),
                                                 ("MXFP4_DEFAULT_CFG", {})])
def test_gptq_on_a_model_keeps_its_codes_and_beats_rtn(model, batches, preset, options):
    block = 16 if preset.startswith("NVFP4") else 32
    rtn = quantized(model, preset, batches, block)
    convert.calibrate(rtn, "max", forward_loop_for(batches))
    gptq = quantized(model, preset, batches, block)
    report = run_algorithm("gptq", gptq, forward_loop_for(batches), {"block_size": 32, **options})
    assert all(entry.mse_after < entry.mse_max for entry in report), report
    reference = logits(model, batches)
    assert (logits(gptq, batches) - reference).square().mean() < (logits(rtn, batches) - reference).square().mean()
    q_proj = gptq.model.layers[0].self_attn.q_proj
    assert q_proj.weight_quantizer.block_amax.shape == (q_proj.out_features, q_proj.in_features // block)
    for module in gptq.modules():  # the fake quantizer gives GPTQ's weights back: the codes it chose are kept
        if isinstance(module, torch.nn.Linear) and module.weight_quantizer.is_enabled:
            torch.testing.assert_close(module.weight_quantizer(module.weight), module.weight, rtol=0, atol=1e-7)


def test_gptq_micro_option_errors(model, batches):
    loop = forward_loop_for(batches)
    nvfp4, mx = quantized(model, "NVFP4_DEFAULT_CFG", batches), quantized(model, "MXFP4_DEFAULT_CFG", batches, 32)
    before = {k: v.clone() for k, v in nvfp4.state_dict().items()}
    with pytest.raises(ValueError, match="block_scales='best'; allowed"):
        run_algorithm("gptq", nvfp4, loop, {"block_scales": "best"})
    with pytest.raises(ValueError, match="'4over6' is not defined for mxfp4"):
        run_algorithm("gptq", mx, loop, {"block_scales": "4over6"})
    with pytest.raises(ValueError, match="needs static_groups=True"):
        run_algorithm("gptq", nvfp4, loop, {"act_order": True})
    with pytest.raises(ValueError, match="needs static_groups=False"):
        run_algorithm("gptq", mx, loop, {"block_scales": "loss", "act_order": True, "static_groups": True})
    with pytest.raises(ValueError, match="fix an integer grid"):
        run_algorithm("gptq", nvfp4, loop, {"scale_estimation": True})
    int4 = quantized(model, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", batches)
    with pytest.raises(ValueError, match="applies to NVFP4 / MX weights only"):
        run_algorithm("gptq", int4, loop, {"block_scales": "mse"})
    after = nvfp4.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_input_error_target_is_the_ridge_least_squares_weight():
    """``V = W C (H_q + d I)^-1`` against float64 least squares of the stacked system [Xq; sqrt(n d / 2) I] V^T =
    [X W^T; 0] (the ridge problem argmin (2/n) ||X W^T - Xq V^T||^2 + d ||V||^2 written as plain least squares)."""
    generator = torch.Generator().manual_seed(5)
    x = correlated_inputs(generator, 300, 32).double()
    xq = x + 0.1 * torch.randn(x.shape, generator=generator, dtype=torch.float64)  # a quantization-like error
    weight = torch.randn(6, 32, generator=generator, dtype=torch.float64)
    accumulator = InputErrorAccumulator(32)
    for rows in (slice(0, 120), slice(120, 300)):
        accumulator.add(x[rows], xq[rows])
    hessian_q, cross = accumulator.result()  # float32 products: compared to float64 to float32 rounding
    torch.testing.assert_close(hessian_q.double(), 2 * xq.T @ xq / 300, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cross.double(), 2 * x.T @ xq / 300, rtol=1e-5, atol=1e-4)
    target = input_error_target(weight, 2 * xq.T @ xq / 300, 2 * x.T @ xq / 300, percdamp=0.01)
    d = 0.01 * (2 * xq.T @ xq / 300).diagonal().mean()
    stacked = torch.cat([xq, (300 * d / 2).sqrt() * torch.eye(32, dtype=torch.float64)])
    expected = torch.linalg.lstsq(stacked, torch.cat([x @ weight.T, torch.zeros(32, 6, dtype=torch.float64)])).solution
    torch.testing.assert_close(target, expected.T, rtol=1e-7, atol=1e-9)
    assert (target - weight).abs().max() > 0.01  # the input error moves the weight


def test_input_error_gptq_lowers_the_w4a4_output_error(model, batches):
    plain = quantized(model, "NVFP4_DEFAULT_CFG", batches)
    run_algorithm("gptq", plain, forward_loop_for(batches), {"block_size": 32})
    aware = quantized(model, "NVFP4_DEFAULT_CFG", batches)
    report = run_algorithm("gptq", aware, forward_loop_for(batches), {"block_size": 32, "input_error": True})
    assert all(entry.mse_after < entry.mse_max for entry in report), report
    reference = logits(model, batches)
    assert (logits(aware, batches) - reference).square().mean() < (logits(plain, batches) - reference).square().mean()
