"""Saving and reloading a model whose embedding and LM head share one parameter (GPT-2): safetensors writes the
shared parameter under one name, and both reloads must still find it."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lowbit


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=128, n_layer=2, n_head=4, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight[3] *= 25.0  # an outlier row in the shared parameter
    return model


def _calibrated(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    batch = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    return lowbit.quantize(model, lowbit.INT4_AWQ_CFG, forward_loop=lambda m: m(batch))


@pytest.mark.parametrize("compressed", [False, True], ids=["save/restore", "save_compressed/load_compressed"])
def test_tied_embedding_model_reloads_with_equal_logits(tmp_path, compressed):
    model = _calibrated(_tiny_gpt2())
    assert model.lm_head.weight is model.transformer.wte.weight
    if compressed:
        lowbit.compress(model)
        lowbit.save_compressed(model, tmp_path / "out")
        reloaded = lowbit.load_compressed(_tiny_gpt2, tmp_path / "out")
    else:
        lowbit.save(model, tmp_path / "out")
        reloaded = lowbit.restore(_tiny_gpt2, tmp_path / "out")
    tokens = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = model(tokens).logits, reloaded(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same tensors and modules: bit-identical
    torch.testing.assert_close(reloaded.transformer.wte.weight, model.transformer.wte.weight, rtol=0, atol=0)
