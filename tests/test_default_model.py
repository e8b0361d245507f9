"""The bundled default model: loads offline, has the documented shape, and predicts held-out text."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowbit.assets import default_model_path, load_default_model
from lowbit.data import default_eval_text
from lowbit.eval import perplexity

# lowbit/assets/README.md: unigram (add-one, train split) perplexity on the held-out tokens; the model
# scores 32.17 on the whole held-out text.
RECORDED_UNIGRAM_PERPLEXITY = 738.4
PREFIX_TOKENS = 4096


@pytest.fixture(scope="module")
def default_model():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        return load_default_model()


def test_files_fit_the_size_limits():
    files = [path for path in default_model_path().iterdir() if path.is_file()]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= {
        path.name for path in files
    }
    assert all(path.stat().st_size <= 15 * 2**20 for path in files)
    assert sum(path.stat().st_size for path in files) <= 24 * 2**20


def test_architecture_and_tokenizer(default_model):
    model, tokenizer = default_model
    config = model.config
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
             config.num_key_value_heads, config.intermediate_size, config.vocab_size)
    assert shape == (256, 8, 4, 2, 768, 4096) and not config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 8_392_960
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 8 * 7 + 1 and all(m.in_features % 128 == 0 for m in linears)
    assert (tokenizer.bos_token, tokenizer.eos_token, len(tokenizer)) == ("<s>", "</s>", 4096)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    text = "Call me Ishmael.\n\nIt is a truth universally acknowledged."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_heldout_perplexity_is_far_below_unigram(default_model):
    model, tokenizer = default_model
    ppl = perplexity(model, tokenizer, default_eval_text(), max_tokens=PREFIX_TOKENS, progress=False)
    assert math.isfinite(ppl) and ppl < RECORDED_UNIGRAM_PERPLEXITY / 10


def test_load_rejects_a_non_float_dtype():
    with pytest.raises(TypeError, match="dtype"):
        load_default_model(dtype=torch.int8)
