"""Tiny seeded models of the families lowbit supports, built from transformers configs (no network).

Every matmul's input dim is a multiple of 128 (hidden 128, MLP 256) so that the INT4 g128 presets
apply; 2 layers (T5: 1 encoder + 1 decoder block), 4 heads of 32, vocabulary 256. ``FAMILIES`` maps a
name to a :class:`Family`: how to build the model and a batch of inputs, and which weights the presets
leave float on purpose (``skipped``: fnmatch patterns of quantizer names). ``MOE_FAMILIES`` is the
list fused-expert families extend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

HIDDEN, MLP, LAYERS, HEADS, HEAD_DIM, VOCAB, TOKENS = 128, 256, 2, 4, 32, 256, 12
DECODER = {"hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": 2, "vocab_size": VOCAB,
           "max_position_embeddings": 64}


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict]
    skipped: tuple[str, ...] = ("*lm_head*",)  # weights the presets keep float (fnmatch on the quantizer name)
    blocks: bool = True  # has repeated blocks: takes the block-wise algorithms
    notes: dict = field(default_factory=dict)


def token_inputs(generator: torch.Generator) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (2, TOKENS), generator=generator)}


def seq2seq_inputs(generator: torch.Generator) -> dict:
    return {**token_inputs(generator), "decoder_input_ids": torch.randint(0, VOCAB, (2, 6), generator=generator)}


def image_inputs(generator: torch.Generator) -> dict:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}


def causal_lm(config_class: str, attn_implementation: str = "sdpa", **overrides) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_class)(**{**DECODER, **overrides})
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)

    return build


def from_config(model_class: str, config_class: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))

    return build


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm + ReLU twice, global pooling, a Linear head: no repeated blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 128, 3, padding=1, stride=2), nn.BatchNorm2d(128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values).mean(dim=(2, 3)))


FAMILIES = {family.name: family for family in [
    Family("llama", causal_lm("LlamaConfig"), token_inputs),
    Family("mistral", causal_lm("MistralConfig", sliding_window=8), token_inputs),
    Family("qwen2", causal_lm("Qwen2Config"), token_inputs),
    Family("qwen3", causal_lm("Qwen3Config", head_dim=HEAD_DIM), token_inputs),
    Family("gemma2", causal_lm("Gemma2Config", head_dim=HEAD_DIM, sliding_window=8, attn_implementation="eager"),
           token_inputs),
    Family("gemma3", causal_lm("Gemma3TextConfig", head_dim=HEAD_DIM, sliding_window=8), token_inputs),
    Family("phi3", causal_lm("Phi3Config", pad_token_id=0), token_inputs),
    Family("gpt2", from_config("GPT2LMHeadModel", "GPT2Config", n_embd=HIDDEN, n_inner=MLP, n_layer=LAYERS,
                               n_head=HEADS, vocab_size=VOCAB, n_positions=64), token_inputs),
    Family("gpt_neox", from_config("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=HIDDEN, intermediate_size=MLP,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB,
                                   max_position_embeddings=64), token_inputs, skipped=()),
    Family("opt", from_config("OPTForCausalLM", "OPTConfig", hidden_size=HIDDEN, ffn_dim=MLP, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, vocab_size=VOCAB, word_embed_proj_dim=HIDDEN,
                              max_position_embeddings=64), token_inputs),
    Family("falcon", from_config("FalconForCausalLM", "FalconConfig", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, vocab_size=VOCAB), token_inputs),
    Family("bert", from_config("BertModel", "BertConfig", hidden_size=HIDDEN, intermediate_size=MLP,
                               num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB,
                               max_position_embeddings=64), token_inputs, skipped=()),
    Family("t5", from_config("T5ForConditionalGeneration", "T5Config", d_model=HIDDEN, d_ff=MLP, d_kv=HEAD_DIM,
                             num_layers=1, num_decoder_layers=1, num_heads=HEADS, vocab_size=VOCAB),
           seq2seq_inputs),
    Family("vit", from_config("ViTForImageClassification", "ViTConfig", hidden_size=HIDDEN, intermediate_size=MLP,
                              num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=32, patch_size=8,
                              num_labels=10), image_inputs, skipped=()),
    Family("cnn", SmallCNN, image_inputs, skipped=(), blocks=False),
]}

# Fused-expert families (Mixtral, Qwen2-MoE, Qwen3-MoE) are added here by the MoE experts work: each a
# Family whose ``skipped`` lists its routers.
MOE = {"num_experts_per_tok": 2, "tie_word_embeddings": False}
MOE_FAMILIES: list[Family] = [
    Family("mixtral", causal_lm("MixtralConfig", num_local_experts=8, **MOE), token_inputs),
    Family("qwen2_moe", causal_lm("Qwen2MoeConfig", num_experts=8, moe_intermediate_size=128,
                                  shared_expert_intermediate_size=MLP, decoder_sparse_step=1, **MOE), token_inputs),
    Family("qwen3_moe", causal_lm("Qwen3MoeConfig", num_experts=8, moe_intermediate_size=128, head_dim=HEAD_DIM,
                                  decoder_sparse_step=1, norm_topk_prob=True, **MOE), token_inputs),
]
for _family in MOE_FAMILIES:
    FAMILIES[_family.name] = _family


OUTLIER_CHANNELS, OUTLIER_GAIN = 4, 8.0


def build(name: str, seed: int = 0) -> nn.Module:
    """The family's model, seeded, in eval mode, with activation outliers as trained LLMs have them:
    ``OUTLIER_CHANNELS`` seeded channels of every norm's weight get ``+OUTLIER_GAIN``."""
    torch.manual_seed(seed)
    model = FAMILIES[name].build().eval()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if "Norm" in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.dim() == 1:
                channels = torch.randperm(weight.numel(), generator=generator)[:OUTLIER_CHANNELS]
                weight[channels] += OUTLIER_GAIN
    return model


def batches(name: str, count: int = 2, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [FAMILIES[name].inputs(generator) for _ in range(count)]
