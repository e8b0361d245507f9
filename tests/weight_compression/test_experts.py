"""compress_weights on fused MoE experts (transformers >= 5.20 3-D Parameters): every expert compressed per
expert and group, against a float64 reference of the format; packed storage equals the fake-quantized experts."""

from __future__ import annotations

import pytest
import torch

from lowbit.compress import compressed_weight_bytes
from lowbit.compress.experts import CompressedExpertsMixin
from lowbit.modules.experts import QuantExpertsMixin
from lowbit.weight_compression import compress_weights, plan_compression
from tests.modules.moe_models import needs_fused_experts, tiny_mixtral, tiny_qwen3_moe

from . import reference

pytestmark = needs_fused_experts


def _experts(model) -> list:
    return [m for m in model.modules() if isinstance(m, (QuantExpertsMixin, CompressedExpertsMixin))]


@pytest.mark.parametrize("mode", ["int4_sym", "int4_asym"])
def test_every_expert_matches_the_float64_reference(mode):
    """Each expert's (out, in) weight, fake-quantized, equals the mode's definition per group of 128 (NNCF's
    signed-scale symmetric grid, or min/max asymmetric; experts get no range search), float32 rounding allowed."""
    model = tiny_mixtral()
    originals = {name: m.gate_up_proj.detach().clone() for name, m in model.named_modules()
                 if hasattr(m, "gate_up_proj")}
    compress_weights(model, mode=mode, group_size=128, ratio=1.0, packed=False)
    expected = reference.int_sym if mode == "int4_sym" else reference.int_asym
    for name, original in originals.items():
        module = model.get_submodule(name)
        quantized = module.quantized_expert_weight("gate_up_proj").detach()
        for expert in range(original.shape[0]):
            torch.testing.assert_close(quantized[expert], expected(original[expert], 4, 128).float(),
                                       rtol=1e-6, atol=1e-7)


def test_packed_experts_equal_fake_quantization_and_take_under_0_3_of_bf16():
    """Packed experts (float16 scales, as compress_weights stores them) dequantize to the fake-quantized experts
    up to the scale's float16 rounding (relative 2**-11); outputs finite; packed bytes <= 0.30x of bf16."""
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    fake, packed = tiny_qwen3_moe(), tiny_qwen3_moe()
    compress_weights(fake, mode="int4_sym", group_size=128, ratio=1.0, packed=False)
    compress_weights(packed, mode="int4_sym", group_size=128, ratio=1.0)
    pairs = list(zip(_experts(fake), _experts(packed), strict=True))
    assert pairs and all(isinstance(m, CompressedExpertsMixin) for _, m in pairs)
    for fake_module, packed_module in pairs:
        for projection in fake_module.projections:
            expected = fake_module.quantized_expert_weight(projection).detach()
            got = packed_module.dequantized_expert_weight(projection)
            torch.testing.assert_close(got, expected, rtol=2**-11, atol=1e-7)
    with torch.no_grad():
        assert torch.isfinite(packed(input_ids=tokens).logits).all()
    packed_bytes, bf16_bytes = compressed_weight_bytes(packed)
    assert packed_bytes <= 0.30 * bf16_bytes


def test_experts_in_the_summary_and_ignored_scope_and_nf4_warning():
    model = tiny_mixtral()
    plan = plan_compression(model, _options(), None, ["*.experts.down_proj"])
    names = [row.name for row in plan.summary().layers if row.kind == "experts"]
    assert names == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    with pytest.warns(UserWarning, match=r"experts\.down_proj \([\d,]+ bytes\)"):
        compress_weights(model, mode="nf4", group_size=128, ratio=1.0, packed=False)


def _options():
    from lowbit.weight_compression import check_options

    return check_options("int4_sym", 128, 1.0, False, None, False, False, False, False, "int8_asym")
