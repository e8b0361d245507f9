"""Gradient scores in a lower precision, against float64 references written here: each linear's output change
from its weight and input changes (AWQ's pre_quant_scale, FP8 and NVFP4 inputs), whole scores under bfloat16
autocast, and the choice of score dtype."""

import copy

import pytest
import torch

from lowbit.presets import get_preset
from lowbit.search.auto import calibrate_formats, resolve_score_dtype
from lowbit.search.candidates import NONE, search_formats
from lowbit.search.output_change import linear_change
from lowbit.search.scores import gradient_scores
from tests.algorithms.tiny_llama import tiny_llama
from tests.search.conftest import forward_step, loss_func

LAYER = "model.layers.0"


def int4_awq_g32():
    """INT4_AWQ_CFG (awq_lite, a pre_quant_scale per linear) with blocks of 32: the tiny model is 64 wide."""
    config = get_preset("INT4_AWQ_CFG")
    config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: 32, "type": "static"}
    return config


FORMATS = [int4_awq_g32(), "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"]
NAMES = ["custom_0", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"]
MODULES = [f"{LAYER}.self_attn.q_proj", f"{LAYER}.self_attn.o_proj", f"{LAYER}.mlp.down_proj",
           "model.layers.1.mlp.up_proj", "lm_head"]  # a linear in every block: AWQ works block by block


@pytest.fixture(scope="module")
def calibrated(batches):
    return calibrate_formats(tiny_llama(), search_formats(FORMATS), MODULES, batches, lambda m, b: m(b),
                             len(batches))


def inputs_with_outliers(features, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, features, generator=generator)
    x[..., 5] *= 30  # an outlier channel
    x[0, 3] *= 8  # an outlier token
    return x


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1.5e-2)])
def test_linear_change_equals_the_output_difference(calibrated, dtype, tolerance):
    """``dy = Q_in(x p) Q_w(W/p)^T - x W^T`` in float64 from the module's own outputs in each format; the
    change is computed from the weight and input changes, so its error is relative to dy itself: ~1e-6 in
    float32 (the algebra; measured 4e-6), ~2^-8 in bfloat16 (measured 0.7 %), not relative to y."""
    awq_scaled = 0
    for index, name in enumerate(MODULES):
        module = calibrated.modules[name]
        x = inputs_with_outliers(module.in_features, seed=index)
        calibrated.apply({})
        float_weight = module.weight.detach().clone()
        with torch.no_grad():
            y = module(x).double()
        for search_format in NAMES:
            state = calibrated.states[search_format][name]
            change = linear_change(module, state.slots, state.tensors.get("weight", float_weight), float_weight,
                                   dtype)
            assert change is not None
            awq_scaled += change.pre_quant_scale is not None
            calibrated.apply_module(name, search_format)
            with torch.no_grad():
                expected = module(x).double() - y
            calibrated.apply_module(name, NONE)
            got = change(x.to(dtype)).double()
            assert got.dtype == torch.float64 and expected.norm() > 1e-3 * y.norm()
            assert (got - expected).norm() <= tolerance * expected.norm(), (name, search_format)
    assert awq_scaled > 0  # AWQ's per-linear scale was exercised


def test_linear_change_refuses_what_its_formula_does_not_describe(calibrated):
    name = f"{LAYER}.mlp.down_proj"
    module = calibrated.modules[name]
    calibrated.apply({})
    float_weight = module.weight.detach().clone()
    state = calibrated.states["FP8_DEFAULT_CFG"][name]
    assert linear_change(module, state.slots, float_weight * 1.01, float_weight, torch.bfloat16) is None
    output_quantizer = copy.deepcopy(state.slots["input_quantizer"])
    slots = {**state.slots, "output_quantizer": output_quantizer}
    assert linear_change(module, slots, float_weight, float_weight, torch.bfloat16) is None
    assert linear_change(tiny_llama().model.embed_tokens, state.slots, float_weight, float_weight,
                         torch.bfloat16) is None


def fisher_reference(calibrated, name, search_format, batches):
    """sum over batches of sum((dL/dy * (y_f - y))^2) in float64: y and dL/dy from the float model, y_f from
    a whole-model forward with ``name`` alone in ``search_format``."""
    model, module = calibrated.model, calibrated.modules[name]
    total = 0.0
    for batch in batches:
        calibrated.apply({})
        captured = {}
        handle = module.register_forward_hook(lambda _m, _a, out, c=captured: c.setdefault("y", out))
        loss = model(batch, labels=batch).loss
        handle.remove()
        grad, = torch.autograd.grad(loss, captured["y"])
        calibrated.apply({name: search_format})
        captured_q = {}
        handle = module.register_forward_hook(lambda _m, _a, out, c=captured_q: c.setdefault("y", out))
        with torch.no_grad():
            model(batch)
        handle.remove()
        total += ((grad.double() * (captured_q["y"].double() - captured["y"].double())) ** 2).sum().item()
    calibrated.apply({})
    return total


def assert_scores_follow_reference(scores, calibrated, modules, formats, batches):
    """Each score within 5 % of the float64 Fisher sum; each module ranks its formats as the reference does."""
    for name in modules:
        expected = {f: fisher_reference(calibrated, name, f, batches) for f in formats}
        for search_format in formats:
            assert scores[name][search_format] == pytest.approx(expected[search_format], rel=5e-2)
        assert sorted(formats, key=scores[name].get) == sorted(formats, key=expected.get)


def test_bfloat16_scores_follow_the_float64_reference_and_keep_the_order(calibrated, batches):
    """Under autocast the forward, backward and changes round to bfloat16: each score within 5 % of the float64
    Fisher sum (measured: 3.1 % at worst here), and every module ranks its formats as the reference does."""
    scores = gradient_scores(calibrated, NAMES, batches, forward_step, loss_func, torch.bfloat16)
    assert_scores_follow_reference(scores, calibrated, MODULES, NAMES, batches)


def test_score_dtype_is_resolved_and_checked():
    model = tiny_llama()
    assert resolve_score_dtype(None, model) is None
    assert resolve_score_dtype(torch.float16, model) is torch.float16
    assert resolve_score_dtype("auto", model) in (None, torch.bfloat16)
    assert resolve_score_dtype("auto", model.to(torch.bfloat16)) is None  # already low precision
    for bad in ("bf16", torch.int8, 16):
        with pytest.raises(ValueError, match="score_dtype="):
            resolve_score_dtype(bad, model)


def tiny_gpt2():
    """GPT-2's Conv1D linears (weight stored (in, out)): not the plain linear the change formula describes, so
    they are called in float32 on inputs cast up while the pass runs in bfloat16."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight[:, [3, 17]] *= 20  # outlier channels
    return model


def test_bfloat16_scores_of_called_modules_follow_the_float64_reference(batches):
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc"]
    formats = ["FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"]
    calibrated = calibrate_formats(tiny_gpt2(), search_formats(formats), names, batches, lambda m, b: m(b),
                                   len(batches))
    assert not any(linear_change(calibrated.modules[n], calibrated.states[f][n].slots,
                                 calibrated.modules[n].weight, calibrated.modules[n].weight, torch.bfloat16)
                   for n in names for f in formats)
    scores = gradient_scores(calibrated, formats, batches, forward_step, loss_func, torch.bfloat16)
    assert_scores_follow_reference(scores, calibrated, names, formats, batches)
