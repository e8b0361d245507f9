"""A tiny seeded Llama with outlier weights and a calibrated quantization of it, shared by the export tests."""

from __future__ import annotations

import copy

import torch

import lowbit

VOCAB, TOKENS = 64, 16


def tiny_llama(seed: int = 0, tie_word_embeddings: bool = False):
    """A 1-layer Llama (hidden 256, 4 heads of 64, 2 KV heads, MLP 512) with seeded weights, a few columns x8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, head_dim=64, architectures=["LlamaForCausalLM"],
                         tie_word_embeddings=tie_word_embeddings)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.weight"):
                columns = torch.randint(0, parameter.shape[1], (3,))
                parameter[:, columns] *= 8.0  # outlier input channels
    return model


def token_batches(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (4, TOKENS), generator=generator)


def quantized(model, config: dict):
    """A deep copy of ``model`` quantized with ``config``, calibrated on ``token_batches()``."""
    batches = token_batches()

    def forward_loop(m):
        for row in batches:
            m(row.unsqueeze(0))

    return lowbit.quantize(copy.deepcopy(model), config, forward_loop)


def preset(name: str, **quant_cfg) -> dict:
    config = lowbit.get_preset(name)
    config["quant_cfg"].update(quant_cfg)
    return config
