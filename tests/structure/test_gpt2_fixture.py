"""The bundled GPT-2 fixture: loads offline, has the documented shape (Conv1D, tied embeddings), predicts
held-out text better than a unigram model, and takes the block-wise algorithms."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.assets import gpt2_model_path, load_gpt2_model
from lowbit.data import default_eval_text
from lowbit.eval import perplexity
from lowbit.structure import quantizable_weights

# lowbit/assets/README.md: unigram (add-one, train split) perplexity on the held-out tokens.
RECORDED_UNIGRAM_PERPLEXITY = 738.4
PREFIX_TOKENS = 2048


@pytest.fixture(scope="module")
def gpt2_model():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        return load_gpt2_model()


def test_files_fit_8_mb():
    files = [path for path in gpt2_model_path().iterdir() if path.is_file()]
    assert {"config.json", "model.safetensors"} <= {path.name for path in files}
    assert sum(path.stat().st_size for path in files) <= 8 * 2**20


def test_architecture(gpt2_model):
    model, tokenizer = gpt2_model
    config = model.config
    assert (config.model_type, config.n_embd, config.n_layer, config.n_head, config.n_inner) == ("gpt2", 256, 4, 4, 768)
    assert config.tie_word_embeddings and model.lm_head.weight is model.transformer.wte.weight
    assert sum(p.numel() for p in model.parameters()) == 3_813_888
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert len(tokenizer) == config.vocab_size == 4096


def test_heldout_perplexity_is_below_unigram(gpt2_model):
    model, tokenizer = gpt2_model
    ppl = perplexity(model, tokenizer, default_eval_text(), max_tokens=PREFIX_TOKENS, progress=False)
    assert math.isfinite(ppl) and ppl < RECORDED_UNIGRAM_PERPLEXITY / 2


def test_every_conv1d_is_a_transposed_record_after_quantize(gpt2_model):
    import copy

    import lowbit

    model = lowbit.quantize(copy.deepcopy(gpt2_model[0]), lowbit.presets.get_preset("INT8_WEIGHT_ONLY_CFG"))
    records = quantizable_weights(model, enabled_only=True)
    assert len(records) == 4 * 4 and {r.kind for r in records.values()} == {"transposed"}
    c_fc = records["transformer.h.0.mlp.c_fc"]
    assert c_fc.weight.shape == (768, 256) and c_fc.weight.data_ptr() == c_fc.module.weight.data_ptr()
