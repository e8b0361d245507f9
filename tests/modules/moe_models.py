"""Tiny fused-expert MoE models (transformers 5 configs, seeded weights) for the MoE tests and the family matrix.

Each builder returns a CausalLM in eval mode whose expert dims are multiples of 128 (INT4 g128 applies):
hidden 128, 2 layers, 8 experts (Mixtral's count), top-2; Mixtral's expert intermediate 256, Qwen's 128; Qwen2-MoE has a
shared expert (a plain MLP, nn.Linear) with a sigmoid gate.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from torch import nn

from tests.core.helpers import fill_seeded

HIDDEN = 128
NUM_EXPERTS = 8
COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
              max_position_embeddings=128, tie_word_embeddings=False, num_experts_per_tok=2)


# transformers 5.19 and older do not build their experts with the `use_experts_implementation` layout lowbit's
# experts module recognises (measured on the floor venv, torch 2.9.1: 5.1-5.19 fail, 5.20.2 passes): fused-expert
# quantization needs transformers >= 5.20; below it the float-bytes warning of quantize() reports the experts.
EXPERTS_MIN_TRANSFORMERS = Version("5.20")
needs_fused_experts = pytest.mark.skipif(Version(transformers.__version__) < EXPERTS_MIN_TRANSFORMERS,
                                         reason=f"fused-expert quantization needs transformers >= "
                                                f"{EXPERTS_MIN_TRANSFORMERS}")


def tiny_mixtral(seed: int = 11, experts_implementation: str | None = None) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**COMMON, intermediate_size=256, num_local_experts=NUM_EXPERTS)
    return _build(MixtralForCausalLM, config, seed, experts_implementation)


def tiny_qwen2_moe(seed: int = 12, experts_implementation: str | None = None) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(**COMMON, intermediate_size=256, moe_intermediate_size=128, num_experts=NUM_EXPERTS,
                            shared_expert_intermediate_size=256, decoder_sparse_step=1)
    return _build(Qwen2MoeForCausalLM, config, seed, experts_implementation)


def tiny_qwen3_moe(seed: int = 13, experts_implementation: str | None = None) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**COMMON, intermediate_size=256, moe_intermediate_size=128, num_experts=NUM_EXPERTS,
                            head_dim=32, decoder_sparse_step=1, norm_topk_prob=True)
    return _build(Qwen3MoeForCausalLM, config, seed, experts_implementation)


def _build(model_cls, config, seed: int, experts_implementation: str | None) -> nn.Module:
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    with torch.random.fork_rng():  # HF initialisation draws from the global RNG; keep it untouched
        model = model_cls(config)
    return fill_seeded(model, seed).eval()


MOE_FAMILIES = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "qwen3_moe": tiny_qwen3_moe}


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the fused-experts modules (3-D ``down_proj``), quantized or not."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "down_proj", None), nn.Parameter) and m.down_proj.dim() == 3}


def assert_every_expert_weight_quantized(model: nn.Module) -> None:
    """The matrix check for MoE families: every fused expert weight has an enabled per-expert weight quantizer
    with a finite amax for every expert (or a dynamic format), and the router gates stay float."""
    from lowbit.expert_quantizer import ExpertQuantizer
    from lowbit.quantizer import SequentialQuantizer

    found = experts_modules(model)
    assert found, "no fused experts module in the model"
    for name, module in found.items():
        for projection in module.projections:
            quantizer = getattr(module, f"{projection}_weight_quantizer")
            stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
            for stage in stages:
                assert isinstance(stage, ExpertQuantizer) and stage.is_enabled, f"{name}.{projection}: not quantized"
                assert stage.num_experts == module.num_experts
                if not stage.config.is_dynamic:
                    assert stage.amax is not None and stage.amax.shape[0] == module.num_experts, f"{name}.{projection}"
                    assert torch.isfinite(stage.amax).all(), f"{name}.{projection}: non-finite amax"
