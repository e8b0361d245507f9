"""LSQ against float64 references written here: the step's gradient (LSQ's ``round(v/d) - v/d`` inside the range,
the clipped code outside; the code itself with the start's codes kept), the weights' straight-through gradient,
the teacher KL, and the end-to-end algorithm on a tiny Llama (never worse than its start on the calibration
data, weights and ranges written back that the format re-rounds to exactly the trained values, compress and
options' errors)."""

import copy

import numpy as np
import pytest
import torch

import lowbit
from lowbit.algorithms.autoround import tunable_weights
from lowbit.algorithms.lsq import LearnedStep, lsq, record_teacher, teacher_kl
from lowbit.algorithms.scale_estimation import IntGrid

from .tiny_llama import forward_loop_for, logits

GROUP = 16


def outlier_weights(rows=6, columns=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    w[torch.rand(rows, columns, generator=generator) < 0.05] *= 6
    return w


def rtn_start(grid, w, shrink):
    """Round-to-nearest on a range shrunk by ``shrink`` (so some weights clip): ``(w_hat0, (amin0, amax0))``."""
    groups = w.reshape(w.shape[0], -1, GROUP)
    amin0, amax0 = grid.own_range(groups)
    amin0, amax0 = (None if amin0 is None else amin0 * shrink), amax0 * shrink
    return grid.fake_quant(groups, amin0, amax0).reshape(w.shape), (amin0, amax0)


def reference_step_gradients(w_hat_grad, v, d0, log_step, qmin, qmax, zero, codes):
    """float64 NumPy: ``dL/dl`` and ``dL/du`` for ``dL/dw_hat`` = ``w_hat_grad`` (groups ``(out, n, g)``), by
    LSQ's formula (``codes`` None: latent ``v`` fixed) or with the codes ``k0 = codes`` kept (``v = d (k0 + u)``)."""
    d = d0 * np.exp(log_step)
    if codes is None:
        raw = np.round(v / d)
        relative = raw if zero is None else np.clip(raw + zero, 0, qmax) - zero  # asymmetric codes clamp with z
        low, high = (qmin, qmax) if zero is None else (-zero, qmax - zero)
        inside = (raw >= low) & (raw <= high)
        step_derivative = np.where(inside, raw - v / d, np.clip(relative, low, high))
        offset_derivative = inside * d0  # v = v0 + d0 u
    else:
        low, high = (qmin, qmax) if zero is None else (-zero, qmax - zero)
        inside = (codes >= low) & (codes <= high)
        step_derivative = np.clip(codes, low, high)
        offset_derivative = inside * d
    grad_log_step = (w_hat_grad * step_derivative).sum(-1, keepdims=True) * d  # dd/dl = d
    return grad_log_step, w_hat_grad * offset_derivative


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("latent", ["float", "codes"])
def test_step_and_weight_gradients_match_float64_reference(asymmetric, latent):
    grid = IntGrid(3 if asymmetric else 4, asymmetric=asymmetric)
    w = outlier_weights()
    w_hat0, start = rtn_start(grid, w, shrink=0.8)
    step = LearnedStep.start_at(grid, w, w_hat0, start, GROUP, latent)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        step.log_step.copy_(0.05 * torch.randn(step.log_step.shape, generator=generator, dtype=torch.float64))
        step.offset.copy_(0.2 * torch.randn(step.offset.shape, generator=generator, dtype=torch.float64))
    step.log_step.requires_grad_()
    step.offset.requires_grad_()
    upstream = torch.randn(w.shape, generator=generator, dtype=torch.float64)
    (step.quantized() * upstream).sum().backward()

    log_step, offset = step.log_step.detach().numpy(), step.offset.detach().numpy()
    d0 = step.start_step.numpy()
    zero = None if step.zero_point is None else step.zero_point.numpy()
    qmin = -(2 ** (grid.num_bits - 1))
    if latent == "float":
        v = step.latent.numpy() + d0 * offset
        grads = reference_step_gradients(upstream.numpy().reshape(v.shape), v, d0, log_step, qmin, grid.qmax, zero,
                                         None)
    else:
        codes = np.round(step.latent.numpy() + offset)
        grads = reference_step_gradients(upstream.numpy().reshape(codes.shape), None, d0, log_step, qmin, grid.qmax,
                                         zero, codes)
    np.testing.assert_allclose(step.log_step.grad.numpy(), grads[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(step.offset.grad.numpy(), grads[1], rtol=1e-9, atol=1e-12)
    assert (step.log_step.grad != 0).all()


@pytest.mark.parametrize("asymmetric", [False, True])
def test_start_reproduces_start_codes_and_float_latent_is_the_float_weight(asymmetric):
    """At ``l = u = 0`` both latents give the start's values (to 1e-6 relative: the format keeps its scales in
    float32, the latents' grid is float64 here); the float latent is
    ``w`` where the start's code is round-to-nearest's, the start's value where the start moved the code."""
    grid = IntGrid(3 if asymmetric else 4, asymmetric=asymmetric)
    w = outlier_weights(seed=1)
    w_hat0, start = rtn_start(grid, w, shrink=0.9)
    groups = w.reshape(w.shape[0], -1, GROUP)
    nudged = groups.clone()  # four small weights pushed one grid step: their start codes move by one
    d0 = (start[1] - start[0]) / grid.qmax if asymmetric else start[1] / grid.qmax
    small = groups[0, 0].abs().argsort()[:4]
    nudged[0, 0, small] += d0[0, 0, 0] * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    moved = grid.fake_quant(nudged, *start)
    for latent in ("float", "codes"):
        step = LearnedStep.start_at(grid, w, moved.reshape(w.shape), start, GROUP, latent)
        torch.testing.assert_close(step.quantized(), moved.reshape(w.shape), rtol=1e-6, atol=0)
    step = LearnedStep.start_at(grid, w, moved.reshape(w.shape), start, GROUP, "float")
    kept = torch.round((grid.fake_quant(groups, *start) - moved) / d0) == 0
    assert (~kept).sum() == 4
    assert torch.equal(step.latent[kept], groups[kept]) and torch.equal(step.latent[~kept], moved[~kept])


def test_teacher_kl_matches_float64_formula():
    generator = torch.Generator().manual_seed(4)
    teacher_logits = 3 * torch.randn(2, 5, 40, generator=generator, dtype=torch.float64)
    teacher_logits[..., 7] += 12  # a confident token
    student = teacher_logits + 0.5 * torch.randn(2, 5, 40, generator=generator, dtype=torch.float64)
    log_p = teacher_logits.numpy() - np.log(np.exp(teacher_logits.numpy()).sum(-1, keepdims=True))
    log_q = student.numpy() - np.log(np.exp(student.numpy()).sum(-1, keepdims=True))
    expected = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
    got = teacher_kl(torch.from_numpy(log_p), student)
    assert abs(float(got) - expected) <= 1e-12 * max(1.0, expected)
    assert float(teacher_kl(torch.from_numpy(log_p).float(), teacher_logits.float())) <= 1e-6  # KL(p || p) = 0


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_teacher_kl_at_a_temperature_matches_float64_formula(temperature):
    """``T^2 KL(softmax(log p / T) || softmax(z / T))`` against float64 NumPy from the teacher's logits (the
    function gets only its float32 log-probabilities, as LSQ records them), with outliers in the logits."""
    generator = torch.Generator().manual_seed(5)
    teacher_logits = 3 * torch.randn(3, 4, 50, generator=generator, dtype=torch.float64)
    teacher_logits[..., 11] += 14  # confident tokens: the softening matters
    teacher_logits[0, 1, 3] -= 25
    student = teacher_logits + 0.7 * torch.randn(3, 4, 50, generator=generator, dtype=torch.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p_t = log_softmax(teacher_logits.numpy() / temperature)
    log_q_t = log_softmax(student.numpy() / temperature)
    expected = temperature**2 * (np.exp(log_p_t) * (log_p_t - log_q_t)).sum(-1).mean()
    recorded = torch.log_softmax(teacher_logits, dim=-1).float()
    got = teacher_kl(recorded, student.float(), temperature)
    assert abs(float(got) - expected) <= 1e-5 * expected  # float32 inputs and sums
    assert float(teacher_kl(recorded, teacher_logits.float(), temperature)) <= 1e-6  # KL(p || p) = 0


def quantized_tiny(model, batches, asymmetric, algorithm):
    config = lowbit.get_preset("INT3_BLOCKWISE_WEIGHT_ONLY_CFG" if asymmetric else "INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: 32, "type": "static"}
    config["algorithm"] = algorithm
    return lowbit.quantize(copy.deepcopy(model), config, forward_loop_for(batches))


@pytest.mark.parametrize("asymmetric", [False, True])
def test_lsq_lowers_calibration_kl_and_writes_back_exactly(model, batches, asymmetric):
    """From RTN (max), LSQ proper: the kept KL is below the start's; each tuned weight is a fixed point of its
    quantizer with the stored range (bit-equal), so the model's logits equal the trained model's; compress keeps
    them."""
    quantized = quantized_tiny(model, batches, asymmetric, None)
    teacher = record_teacher(quantized, tunable_weights(quantized), forward_loop_for(batches))
    lowbit.calibrate(quantized, "max", forward_loop_for(batches))
    before = copy.deepcopy(quantized)
    start_kl, kept_kl = lsq(quantized, teacher, iterations=30, lr=0.01, weight_lr=0.01, latent="float")
    assert kept_kl < 0.9 * start_kl
    for name, weight in tunable_weights(quantized).items():
        assert torch.equal(weight.weight_quantizer(weight.weight), weight.weight), name
        assert not torch.equal(weight.weight_quantizer.amax, tunable_weights(before)[name].weight_quantizer.amax)
    with torch.no_grad():  # the model as written back scores what training kept (float32 sums: 1e-5)
        kl = np.mean([float(teacher_kl(p, quantized(b).logits))
                      for p, b in zip(teacher.log_probs, batches, strict=True)])
    assert abs(kl - kept_kl) <= 1e-5 * kept_kl
    compressed = lowbit.compress(copy.deepcopy(quantized))
    torch.testing.assert_close(logits(compressed, batches), logits(quantized, batches), rtol=1e-4, atol=1e-4)


def test_lsq_keeps_the_start_when_tuning_is_worse(model, batches):
    quantized = quantized_tiny(model, batches, False, None)
    teacher = record_teacher(quantized, tunable_weights(quantized), forward_loop_for(batches))
    lowbit.calibrate(quantized, "max", forward_loop_for(batches))
    start = {name: tensor.clone() for name, tensor in quantized.state_dict().items()}
    start_kl, kept_kl = lsq(quantized, teacher, iterations=3, lr=3.0)  # steps x e^+-6: far worse
    assert kept_kl == start_kl
    for name, tensor in quantized.state_dict().items():
        assert torch.equal(tensor, start[name]), name


def test_lsq_from_config_runs_its_start_then_the_steps(model, batches, caplog):
    algorithm = {"method": "lsq", "start": "autoround", "start_options": {"iterations": 5}, "iterations": 5,
                 "latent": "codes", "temperature": 2.0}
    with caplog.at_level("INFO", logger="lowbit"):
        quantized = quantized_tiny(model, batches, False, algorithm)
    assert any("autoround" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("lsq: calibration KL (T = 2)") for r in caplog.records)
    for name, weight in tunable_weights(quantized).items():
        assert torch.equal(weight.weight_quantizer(weight.weight), weight.weight), name


@pytest.mark.parametrize("options, message", [
    ({"iterations": 0}, "iterations=0"),
    ({"lr": 0.0}, "lr=0.0"),
    ({"weight_lr": -1.0}, "weight_lr=-1.0"),
    ({"latent": "weights"}, "latent='weights'"),
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"start": "lsq"}, "start='lsq'"),
    ({"start": "gptq", "start_options": {"steps": 3}}, "unknown options"),
])
def test_lsq_options_are_checked_before_the_model_is_touched(options, message):
    with pytest.raises(ValueError, match=message):
        lowbit.parse_config({"quant_cfg": {"*weight_quantizer": {"num_bits": 4}}, "algorithm": {"method": "lsq",
                                                                                                 **options}})


def test_lsq_needs_calibration_data(model):
    config = lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: 32, "type": "static"}
    config["algorithm"] = "lsq"
    with pytest.raises(ValueError, match="forward_loop is None"):
        lowbit.quantize(copy.deepcopy(model), config)
