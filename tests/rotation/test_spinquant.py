"""SpinQuant's Cayley SGD and learned rotations against float64 references written here: the closed-form 2 x 2
Cayley rotation, the Riemannian gradient it steps along, a quadratic loss, and, on a tiny seeded Llama with
outlier channels, float logits unchanged by the fused rotations (1e-4 relative) and a lower calibration KL
than at the Hadamard start."""

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.commands import quantize_config
from lowbit.rotation.spinquant import cayley_step, skew_gradient, spinquant


def orthogonal(n, seed):
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def with_outliers(shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x.view(-1)[:: max(1, x.numel() // 5)] *= 50
    return x


def test_cayley_step_keeps_the_rotation_orthogonal():
    rotation, gradient = orthogonal(48, 0), with_outliers((48, 48), 1)
    skew = skew_gradient(rotation, gradient)
    torch.testing.assert_close(skew, -skew.T, rtol=0, atol=0)
    eye = torch.eye(48, dtype=torch.float64)
    for lr in (1e-3, 0.1, 10.0):
        stepped = cayley_step(rotation, skew, lr)
        assert (stepped.T @ stepped - eye).abs().max() < 1e-10, lr
        assert (stepped - rotation).abs().max() > 1e-6  # it did move


def test_cayley_step_matches_the_closed_form_on_2x2():
    """For A = t J (J the 90-degree generator), (I + h A)^-1 (I - h A) is the rotation by -2 atan(h t)."""
    def rot(angle):
        return torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                            dtype=torch.float64)

    rotation = rot(0.7)
    gradient = torch.tensor([[0.3, -1.2], [2.5, 0.4]], dtype=torch.float64)
    product = gradient @ rotation.T
    t = float(product[1, 0] - product[0, 1])  # A[1, 0] of A = G R^T - R G^T
    for lr in (0.05, 0.8, 3.0):
        expected = rot(-2 * math.atan(lr * t / 2)) @ rotation
        torch.testing.assert_close(cayley_step(rotation, skew_gradient(rotation, gradient), lr), expected,
                                   rtol=0, atol=1e-13)


def test_cayley_step_follows_the_riemannian_gradient():
    """(step(h) - R) / h -> -(G - R G^T R) as h -> 0: the descent direction on the Stiefel manifold."""
    rotation, gradient = orthogonal(16, 2), with_outliers((16, 16), 3)
    h = 1e-7
    direction = (cayley_step(rotation, skew_gradient(rotation, gradient), h) - rotation) / h
    riemannian = gradient - rotation @ gradient.T @ rotation
    torch.testing.assert_close(direction, -riemannian, rtol=0, atol=1e-5 * riemannian.abs().max().item())


def test_one_cayley_step_decreases_a_quadratic_loss():
    """L(R) = ||X R - Y||^2 with Y = X T (T orthogonal), G = 2 X^T (X R - Y)."""
    x, target, rotation = with_outliers((64, 24), 4), orthogonal(24, 5), orthogonal(24, 6)
    y = x @ target

    def loss(r):
        return float(((x @ r - y) ** 2).sum())

    gradient = 2 * x.T @ (x @ rotation - y)
    skew = skew_gradient(rotation, gradient)
    lr = 0.5 / torch.linalg.matrix_norm(skew, ord=1).item()
    assert loss(cayley_step(rotation, skew, lr)) < loss(rotation)
    assert loss(cayley_step(rotation, -skew, lr)) > loss(rotation)  # the opposite sign ascends


def tiny_llama(seed=0):
    """A 2-layer Llama (hidden 128, 4 heads of 32, 2 KV heads) with seeded weights, random RMSNorm scales and
    a few residual channels 30x larger (the outliers rotations spread)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 2.0)
        model.model.embed_tokens.weight[:, [3, 70, 101]] *= 30
    return model


def batches(seed=0, count=2):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (4, 32), generator=generator)} for _ in range(count)]


def forward_loop(data):
    def loop(model):
        with torch.no_grad():
            for batch in data:
                model(**batch)
    return loop


def nvfp4_model(model, rotation):
    config = lowbit.get_preset("NVFP4_DEFAULT_CFG")
    config["algorithm"] = {"method": "max", "rotate": rotation}
    return lowbit.quantize(copy.deepcopy(model), config, forward_loop(batches()))


def test_fused_learned_rotation_keeps_the_float_logits():
    model = tiny_llama()
    ids = batches(seed=9, count=1)[0]["input_ids"]
    with torch.no_grad():
        reference = model(ids).logits
    start = nvfp4_model(model, {"method": "spinquant", "steps": 0})
    learned = nvfp4_model(model, {"method": "spinquant", "steps": 5})
    for quantized in (start, learned):
        lowbit.disable_quantizer(quantized, "*")
        with torch.no_grad():
            logits = quantized(ids).logits
        assert (logits - reference).norm() / reference.norm() < 1e-4
    moved = learned.model.embed_tokens.weight - start.model.embed_tokens.weight
    assert moved.norm() > 1e-3 * start.model.embed_tokens.weight.norm(), "the learned rotation left the start"
    assert not any(module._forward_pre_hooks for module in learned.modules()), "no online rotation"


def calibration_kl(model, quantized, data):
    """Mean per-token KL(float || quantized) over ``data``, float64."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in data:
            p = torch.log_softmax(model(**batch).logits.double(), -1)
            q = torch.log_softmax(quantized(**batch).logits.double(), -1)
            total += float((p.exp() * (p - q)).sum(-1).sum())
            tokens += p.shape[0] * p.shape[1]
    return total / tokens


def test_learned_rotation_lowers_the_calibration_loss():
    model, data = tiny_llama(seed=1), batches()
    config = lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["algorithm"] = None
    results = {}
    for steps in (0, 20):
        quantized = lowbit.quantize(copy.deepcopy(model), config)
        losses = spinquant(quantized, forward_loop(data), steps=steps, lr=1.5)
        results[steps] = (calibration_kl(model, quantized, data), losses)
    start, learned = results[0][0], results[20][0]
    assert learned < 0.9 * start, (start, learned)
    assert results[20][1][0] == pytest.approx(calibration_kl(model, model_at_start(model, config, data), data[:1]),
                                              rel=1e-3)


def model_at_start(model, config, data):
    quantized = lowbit.quantize(copy.deepcopy(model), config)
    spinquant(quantized, forward_loop(data), steps=0)
    return quantized


def test_spinquant_composes_with_gptq_after_it():
    model, data = tiny_llama(seed=2), batches()
    config = lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["algorithm"] = {"method": "gptq", "rotate": {"method": "spinquant", "steps": 3}}
    together = lowbit.quantize(copy.deepcopy(model), config, forward_loop(data))
    config["algorithm"] = None
    apart = lowbit.quantize(copy.deepcopy(model), config)
    spinquant(apart, forward_loop(data), steps=3)
    lowbit.calibrate(apart, "gptq", forward_loop(data))
    for (name, a), b in zip(together.named_parameters(), apart.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_rotate_option_names_the_bad_value():
    config = lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    for rotate, message in (("spin", "rotate='spin': unknown rotation; allowed: \\['quarot', 'spinquant'\\]"),
                            ({"method": "spinquant", "stepz": 1}, "unknown options \\['stepz'\\]"),
                            ({"method": "spinquant", "steps": -1}, "steps=-1 must be an int >= 0"),
                            ({"method": "spinquant", "lr": 0}, "lr=0 must be a number > 0"),
                            ({"method": "hadamard"}, "method='hadamard' is unknown")):
        with pytest.raises(ValueError, match=message):
            lowbit.parse_config({**config, "algorithm": {"method": "max", "rotate": rotate}})
    with pytest.raises(ValueError, match="forward_loop is required"):
        lowbit.quantize(tiny_llama(), {**config, "algorithm": {"method": "hqq", "rotate": "spinquant"}})


def test_cli_algorithm_json_selects_spinquant():
    config = quantize_config("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", None,
                             '{"method": "gptq", "rotate": {"method": "spinquant", "steps": 50}}')
    parsed = lowbit.parse_config(config)
    assert parsed.algorithm == "gptq" and parsed.algorithm_options["rotate"] == {"method": "spinquant", "steps": 50}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_spinquant_runs_on_cuda_and_keeps_the_float_logits():
    model = tiny_llama().cuda()
    data = [{key: value.cuda() for key, value in batch.items()} for batch in batches()]
    with torch.no_grad():
        reference = model(**data[0]).logits
    quantized = lowbit.quantize(copy.deepcopy(model), {**lowbit.get_preset("NVFP4_DEFAULT_CFG"), "algorithm": None})
    losses = spinquant(quantized, forward_loop(data), steps=5)
    assert losses[-1] < losses[0]
    lowbit.disable_quantizer(quantized, "*")
    with torch.no_grad():
        logits = quantized(**data[0]).logits
    assert (logits - reference).norm() / reference.norm() < 1e-4
