"""A tiny Llama with outlier activation channels, a forward loop and logits: shared by the
layer-wise algorithm tests (random weights from a local generator; the global RNG is left as it was)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed=0):
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    with torch.random.fork_rng():
        model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.2 if "norm" in name else 0.08
            parameter.copy_(("norm" in name) + scale * torch.randn(parameter.shape, generator=generator))
        model.model.embed_tokens.weight[:, [3, 17, 40]] *= 25  # outlier channels, as in real LLMs
    return model


def forward_loop_for(batches):
    def forward_loop(model):
        for batch in batches:
            model(batch)

    return forward_loop


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(batch).logits for batch in batches]).double()
