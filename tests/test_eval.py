"""lowbit.eval: sliding-window perplexity vs a float64 token-by-token reference, model_size, format_table."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lowbit.assets import default_model_path
from lowbit.data import token_stream
from lowbit.eval import format_table, model_size, perplexity, sliding_windows

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. Call me Ishmael. In the beginning God created the heaven and the earth.\n\n"
    "ABASEMENT, n. A decent and customary mental attitude in the presence of wealth or power. 0x7F!"
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    """A random 2-layer Llama in float64 with grouped-query attention and outlier-scaled weights."""
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=64)
    generator = torch.Generator().manual_seed(1234)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            values = torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.2
            values.view(-1)[:: max(1, values.numel() // 5)] *= 10.0  # a few outliers
            parameter.copy_(values if parameter.ndim > 1 else 1.0 + values.abs())
    return model


def reference_perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int, stride: int) -> float:
    """Token by token: token t is predicted from the tokens since the start of the first window
    (starts 0, stride, 2*stride, ...) whose end min(start + seq_len, n) lies beyond t; a token that
    starts its window has no context and is not scored."""
    n, total, scored = len(tokens), 0.0, 0
    for t in range(1, n):
        start = next(k * stride for k in range(n) if min(k * stride + seq_len, n) > t)
        if start == t:
            continue
        with torch.no_grad():
            logits = model(input_ids=tokens[None, start : t + 1]).logits[0, -2].double()
        total -= torch.log_softmax(logits, dim=-1)[tokens[t]].item()
        scored += 1
    return math.exp(total / scored)


@pytest.mark.parametrize(("seq_len", "stride", "max_tokens"), [(16, 6, 48), (12, 12, 40), (64, 5, 30)])
def test_perplexity_matches_float64_reference(tiny_llama, tokenizer, seq_len, stride, max_tokens):
    tokens = token_stream(tokenizer, TEXT)[:max_tokens]
    assert len(tokens) == max_tokens and (len(tokens) > 2 * seq_len or seq_len > len(tokens))
    expected = reference_perplexity(tiny_llama, tokens, seq_len, stride)
    got = perplexity(tiny_llama, tokenizer, TEXT, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                     progress=False)
    assert got == pytest.approx(expected, rel=1e-6)


def test_perplexity_restores_training_mode(tiny_llama, tokenizer):
    tiny_llama.train()
    try:
        perplexity(tiny_llama, tokenizer, TEXT, seq_len=16, stride=8, max_tokens=20, progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


@pytest.mark.parametrize(("num_tokens", "seq_len", "stride"), [(2, 8, 3), (8, 8, 8), (100, 16, 6), (101, 10, 10)])
def test_sliding_windows_score_each_token_once_and_only_with_context(num_tokens, seq_len, stride):
    windows = sliding_windows(num_tokens, seq_len, stride)
    scored = []
    for begin, end, first in windows:
        assert 0 <= begin < first <= end <= num_tokens and end - begin <= seq_len
        scored += range(first, end)
    window_starts = {begin for begin, _, _ in windows}
    unscored = {0} | (window_starts if stride == seq_len else set())
    assert scored == [t for t in range(num_tokens) if t not in unscored]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"seq_len": 1}, "seq_len"), ({"stride": 9, "seq_len": 8}, "stride"), ({"stride": 1.5}, "stride"),
     ({"max_tokens": 1}, "max_tokens"), ({"text": "a"}, "at least 2")],
)
def test_perplexity_rejects_bad_arguments(tiny_llama, tokenizer, kwargs, message):
    arguments = {"text": TEXT, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        perplexity(tiny_llama, tokenizer, **arguments)


def test_perplexity_rejects_non_str_text(tiny_llama, tokenizer):
    with pytest.raises(TypeError, match="text"):
        perplexity(tiny_llama, tokenizer, ["a list"], progress=False)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)  # 80 float32 = 320 bytes
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: counted once
        block = torch.zeros(4, 6, dtype=torch.bfloat16)  # 24 bf16 = 48 bytes
        self.register_buffer("left", block[:, :3])  # two views of one storage: counted once, whole
        self.register_buffer("right", block[:, 3:])
        self.register_buffer("packed", torch.zeros(7, dtype=torch.uint8))  # 7 bytes
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float16))  # 6 bytes


def test_model_size_counts_each_storage_once():
    model = _Shared()
    model.child = nn.Sequential(model.embed)  # the same module reachable twice
    assert model_size(model) == 320 + 48 + 7 + 6


def test_model_size_counts_meta_tensors_by_shape_and_rejects_non_modules():
    with torch.device("meta"):
        model = nn.Linear(16, 4)
    assert model_size(model) == (16 * 4 + 4) * 4
    with pytest.raises(TypeError, match="model"):
        model_size(torch.zeros(3))


def test_format_table_aligns_columns():
    rows = [{"format": "bf16", "ppl": 32.1712, "bytes": 16794880},
            {"format": "int4 awq", "ppl": 35.5, "note": "g128"}]
    assert format_table(rows) == "\n".join([
        "format      ppl       bytes  note",
        "--------  -----  ----------  ----",
        "bf16      32.17  16,794,880",
        "int4 awq   35.5              g128",
    ])
    assert format_table([]) == ""
    with pytest.raises(TypeError, match="rows"):
        format_table([("not", "a dict")])
