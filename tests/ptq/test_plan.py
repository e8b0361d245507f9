"""lowbit.plan: which weights each rule quantizes and which stay float (and why), bytes before and after from
the formats' definitions written here, and the model untouched; the plan agrees with what quantize then does."""

import copy

import torch
from torch import nn

import lowbit
from lowbit.ptq.qformats import ptq_config
from tests.export.tiny import quantized, tiny_llama


def expected_bytes(numel: int, element_bits: int, groups: int, scale_bits: int, extra_bits: int = 0) -> int:
    return -(-(numel * element_bits + groups * scale_bits + extra_bits) // 8)


def test_plan_bytes_follow_the_format_definitions_and_leave_the_model_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = lowbit.plan(model, ptq_config("int4_awq"))
    assert all(not hasattr(type(m), "original_class") for m in model.modules())  # nothing converted
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    q_proj = next(w for w in plan.weights if w.name == "model.layers.0.self_attn.q_proj.weight_quantizer")
    n, k = 256, 256  # INT4, one float16 scale per 128 inputs of a row
    assert q_proj.bytes_before == n * k * 4
    assert q_proj.bytes_after == expected_bytes(n * k, 4, n * k // 128, 16)
    nvfp4 = lowbit.plan(model, ptq_config("nvfp4"))
    down = next(w for w in nvfp4.weights if w.name.endswith("down_proj.weight_quantizer"))
    n, k = 256, 512  # E2M1 codes, one E4M3 scale per 16, one float32 global scale
    assert down.bytes_after == expected_bytes(n * k, 4, n * k // 16, 8, 32)
    assert nvfp4.bytes_before == sum(p.numel() * p.element_size() for p in model.parameters())


def test_float_weights_say_why_and_rules_name_what_they_decide():
    model = tiny_llama()
    config = ptq_config("fp8", "fp8")
    config["quant_cfg"]["*mlp.down_proj*"] = {"enable": False}
    plan = lowbit.plan(model, config)
    reasons = {w.name: w.reason for w in plan.left_float}
    assert reasons["lm_head.weight_quantizer"] == "rule '*lm_head*' disables it"
    assert reasons["model.layers.0.mlp.down_proj.weight_quantizer"] == "rule '*mlp.down_proj*' disables it"
    assert reasons["model.embed_tokens.weight"].startswith("embedding")
    assert len(plan.rule_matches["*[kv]_bmm_quantizer"]) == 2
    assert sorted(plan.activations) == sorted(
        [f"model.layers.0.self_attn.{x}_proj.input_quantizer" for x in "qkvo"]
        + [f"model.layers.0.mlp.{x}_proj.input_quantizer" for x in ("gate", "up")]
        + ["model.layers.0.self_attn.k_bmm_quantizer", "model.layers.0.self_attn.v_bmm_quantizer"])


def test_plan_matches_what_quantize_does():
    model = tiny_llama()
    config = ptq_config("w4a8_awq")
    plan = lowbit.plan(model, config)
    done = quantized(copy.deepcopy(model), config)
    enabled = {name for name, q in lowbit.iter_quantizers(done) if name.endswith("weight_quantizer") and q.is_enabled}
    assert {w.name for w in plan.quantized} == enabled
    assert plan.bytes_after == lowbit.report.packed_weight_bytes(done, high_precision_bytes=4)


def test_a_meta_model_plans_without_storage():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 32))
    plan = lowbit.plan(model, {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0}}, "algorithm": "max"})
    assert plan.weights[0].bytes_after == expected_bytes(32 * 64, 8, 32, 16)
