"""auto_quantize on a tiny fused-expert Qwen2-MoE: one choice for all experts of a layer, routers kept out
(default disabled_layers), and the active_moe cost counting the routed share of the experts."""

import pytest
import torch

from lowbit.search import auto_quantize
from lowbit.search.candidates import NONE
from tests.modules.moe_models import NUM_EXPERTS, needs_fused_experts, tiny_qwen2_moe

pytestmark = needs_fused_experts
FORMATS = ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"]
BITS = {"NVFP4_DEFAULT_CFG": lambda n: 4 * n + n // 2, "FP8_DEFAULT_CFG": lambda n: 8 * n, NONE: lambda n: 16 * n}


@pytest.fixture(scope="module")
def batches():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (2, 16), generator=generator) for _ in range(2)]


def run(batches, constraints):
    return auto_quantize(tiny_qwen2_moe(), constraints, FORMATS, batches, lambda m, b: m(b, labels=b),
                         lambda out, b: out.loss, num_calib_steps=1, num_score_steps=1)


def expected_bits(model, state, expert_weight):
    """Effective bits written out from the weights' shapes: experts weigh ``expert_weight``, routers count 16
    bits; per-tensor FP32 scales (one per expert and projection for experts) added."""
    total = numel = 0.0
    assignment = state.assignment
    for name, module in model.named_modules():
        stacked = [p for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        if stacked:
            weight, tensors = expert_weight, sum(p.shape[0] for p in stacked)
            count = sum(p.numel() for p in stacked)
        elif isinstance(module, torch.nn.Linear):
            weight, tensors, count = 1.0, 1, module.weight.numel()
        else:
            continue
        choice = assignment.get(name, NONE)
        scales = {"NVFP4_DEFAULT_CFG": 32 * tensors, "FP8_DEFAULT_CFG": 32 * tensors, NONE: 0}[choice]
        total += weight * (BITS[choice](count) + scales)
        numel += weight * count
    return total / numel


def test_experts_share_one_choice_and_routers_stay_out(batches):
    model, state = run(batches, {"effective_bits": 6.0})
    experts = [g for g in state.groups if any(m.endswith("mlp.experts") for m in g.modules)]
    assert len(experts) == 2 and all(len(g.modules) == 1 for g in experts)  # one fused module per layer
    assert state.disabled == ["model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"]
    assert not any(m.endswith("mlp.gate") for g in state.groups for m in g.modules)
    assert state.effective_bits == pytest.approx(expected_bits(model, state, 1.0), rel=1e-9)
    assert state.effective_bits <= 6.0


def test_active_moe_cost_weighs_the_routed_share(batches):
    model, state = run(batches, {"effective_bits": 6.0, "cost_model": "active_moe"})
    ratio = 2 / NUM_EXPERTS  # num_experts_per_tok / num_experts from the model config
    assert state.effective_bits == pytest.approx(expected_bits(model, state, ratio), rel=1e-9)
    assert state.effective_bits <= 6.0
    with pytest.raises(ValueError, match=r"active_moe_expert_ratio'\]=1.5"):
        run(batches, {"effective_bits": 6.0, "cost_model": "active_moe", "cost": {"active_moe_expert_ratio": 1.5}})
