"""lowbit.eval.divergence and lowbit.eval.topk against float64 formulas written here, token by token."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lowbit.assets import default_model_path
from lowbit.data import token_stream
from lowbit.eval import (
    TopKReference,
    divergence,
    opposite_order_pairs,
    save_topk_reference,
    sliding_windows,
    token_kl,
    topk_kl_bounds,
)

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. Call me Ishmael. In the beginning God created the heaven and the earth.\n\n"
    "ABASEMENT, n. A decent and customary mental attitude in the presence of wealth or power. 0x7F!"
)
SEQ_LEN, STRIDE, MAX_TOKENS = 16, 6, 40


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def models(tokenizer):
    """A random 2-layer float32 Llama with outlier-scaled weights, and a copy with 3 % noise on its linears."""
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=64)
    generator = torch.Generator().manual_seed(99)
    reference = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            values = torch.randn(parameter.shape, generator=generator) * 0.15
            values.view(-1)[:: max(1, values.numel() // 7)] *= 5.0  # a few outliers
            parameter.copy_(values if parameter.ndim > 1 else 1.0 + values.abs())
    noisy = copy.deepcopy(reference)
    with torch.no_grad():
        for parameter in noisy.parameters():
            if parameter.ndim > 1:
                parameter.mul_(1 + 0.03 * torch.randn(parameter.shape, generator=generator))
    return reference, noisy


def reference_scores(reference, model, tokens: torch.Tensor) -> dict:
    """Token by token in float64: each scored token t is predicted from its window's tokens before it (the
    windows of lowbit.eval.perplexity.sliding_windows), by each model in its own forward pass."""
    kl, agree, nll, reference_nll = [], 0, 0.0, 0.0
    for begin, end, first in sliding_windows(len(tokens), SEQ_LEN, STRIDE):
        for t in range(first, end):
            with torch.no_grad():
                p_logits = reference(input_ids=tokens[None, begin:t]).logits[0, -1].double()
                q_logits = model(input_ids=tokens[None, begin:t]).logits[0, -1].double()
            log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
            kl.append(float(sum(math.exp(a) * (a - b) for a, b in zip(log_p.tolist(), log_q.tolist(), strict=True))))
            agree += int(p_logits.argmax() == q_logits.argmax())
            nll -= log_q[tokens[t]].item()
            reference_nll -= log_p[tokens[t]].item()
    count = len(kl)
    return {"kl": np.array(kl), "top1": agree / count, "perplexity": math.exp(nll / count),
            "reference_perplexity": math.exp(reference_nll / count)}


def test_model_against_itself_has_zero_kl_and_full_top1(models, tokenizer):
    reference, _ = models
    scores = divergence(copy.deepcopy(reference), reference, tokenizer, TEXT, SEQ_LEN, STRIDE, MAX_TOKENS,
                        progress=False)
    assert scores.mean_kl == 0.0 and scores.kl_p99 == 0.0 and scores.top1 == 1.0
    assert scores.perplexity == scores.reference_perplexity and scores.tail_bound == 0.0
    assert scores.tokens == MAX_TOKENS - 1


def test_divergence_leaves_the_callers_grad_mode_as_it_was(models, tokenizer):
    """divergence() walks two window generators in step; a no_grad held across their yields leaves the
    caller's (thread-global) grad mode off when they finish in the other order than they started."""
    reference, noisy = models
    assert torch.is_grad_enabled()
    divergence(noisy, reference, tokenizer, TEXT, SEQ_LEN, STRIDE, MAX_TOKENS, progress=False)
    assert torch.is_grad_enabled()


def test_mean_kl_equals_the_float64_formula(models, tokenizer):
    reference, noisy = models
    expected = reference_scores(reference, noisy, token_stream(tokenizer, TEXT)[:MAX_TOKENS])
    scores = divergence(noisy, reference, tokenizer, TEXT, SEQ_LEN, STRIDE, MAX_TOKENS, progress=False)
    assert 1e-3 < expected["kl"].mean() < 0.1  # the noise is visible, the models close
    assert scores.mean_kl == pytest.approx(expected["kl"].mean(), abs=1e-6)
    assert scores.kl_p99 == pytest.approx(np.percentile(expected["kl"], 99), abs=1e-6)
    assert scores.top1 == pytest.approx(expected["top1"]) and scores.top1 < 1.0
    assert scores.perplexity == pytest.approx(expected["perplexity"], rel=1e-6)
    assert scores.reference_perplexity == pytest.approx(expected["reference_perplexity"], rel=1e-6)


def _random_log_probs(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 log-softmax tables; logits with outliers, the second a perturbed copy of the first."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3
    logits.view(-1)[:: 97] *= 6.0
    other = logits + torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 0.7
    return torch.log_softmax(logits, -1), torch.log_softmax(other, -1)


def _float64_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p_v (log p_v - log q_v) per row, a Python float64 loop; terms with p_v = 0 count 0."""
    return torch.tensor([sum(math.exp(a) * (a - b) for a, b in zip(p, q, strict=True) if a > -math.inf)
                         for p, q in zip(log_p.tolist(), log_q.tolist(), strict=True)], dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_kl_is_nonnegative_and_matches_float64_on_random_logits(seed):
    log_p, log_q = _random_log_probs(64, 300, seed)
    expected = _float64_kl(log_p, log_q)
    got32 = token_kl(log_p.float(), log_q.float())
    assert got32.dtype == torch.float32 and (got32 >= 0).all()
    assert torch.allclose(got32.double(), expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(token_kl(log_p, log_q), expected, rtol=1e-12, atol=1e-14)
    assert (token_kl(log_q, log_p) >= 0).all()  # the other direction too
    assert token_kl(torch.tensor([[0.0, -math.inf]]), torch.tensor([[-1e-9, -20.0]])).isfinite().all()  # 0 log 0


def _top_k(log_p: torch.Tensor, k: int):
    top = log_p.topk(k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, top.indices, -math.inf), -1)
    return top.values, top.indices, tail


@pytest.mark.parametrize("k", [1, 8, 60, 299])
def test_topk_bounds_bracket_the_full_kl(k):
    log_p, log_q = _random_log_probs(64, 300, seed=k)
    expected = _float64_kl(log_p, log_q)
    lower, upper = topk_kl_bounds(*_top_k(log_p, k), log_q)
    assert (lower <= expected + 1e-12).all() and (expected <= upper + 1e-12).all()
    if k == 299:  # a one-token tail is known exactly from its mass
        assert torch.allclose(lower, expected, rtol=1e-10)
    exact_lower, exact_upper = topk_kl_bounds(*_top_k(log_p, 300), log_q)  # no tail
    assert torch.allclose(exact_lower, expected, rtol=1e-10) and torch.equal(exact_lower, exact_upper)


@pytest.mark.parametrize("tail_mass", [0.2, 0.25])
def test_topk_upper_bound_is_reached_by_the_worst_tail(tail_mass):
    """P puts cap = 0.1 (its smallest top-k probability) on the tail tokens of smallest q, and the remainder on
    the next one: the arrangement the upper bound assumes, so its KL equals the bound."""
    log_q = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.5, 0.5, -4.0, 0.0, -6.0, -1.0, -5.0, 0.2]],
                                           dtype=torch.float64), -1)
    p = torch.zeros(1, 10, dtype=torch.float64)
    p[0, :3] = torch.tensor([0.8 - tail_mass, 0.1, 0.1], dtype=torch.float64)
    p[0, 6], p[0, 8] = 0.1, 0.1  # the two smallest q in the tail (logits -6, -5)
    if tail_mass > 0.2:
        p[0, 4] = tail_mass - 0.2  # the next smallest (logit -4)
    log_p = p.log()
    top_values = log_p[:, :3]
    log_tail = torch.tensor([math.log(tail_mass)], dtype=torch.float64)
    _, upper = topk_kl_bounds(top_values, torch.tensor([[0, 1, 2]]), log_tail, log_q)
    assert upper.item() == pytest.approx(_float64_kl(log_p, log_q).item(), rel=1e-10)


def test_topk_file_agrees_with_the_full_reference_within_its_bound(models, tokenizer, tmp_path):
    reference, noisy = models
    full = divergence(noisy, reference, tokenizer, TEXT, SEQ_LEN, STRIDE, MAX_TOKENS, progress=False)
    for k in (4, 64):
        path = save_topk_reference(reference, tokenizer, TEXT, tmp_path / f"ref{k}.safetensors", k, SEQ_LEN, STRIDE,
                                   MAX_TOKENS, progress=False)
        stored = TopKReference(path)
        assert stored.k == k and stored.positions == MAX_TOKENS - 1 and stored.vocab_size == len(tokenizer)
        assert stored.nbytes == path.stat().st_size > 8 * MAX_TOKENS + 4 * stored.positions * (2 * k + 2)
        topk = divergence(noisy, path, tokenizer, TEXT, SEQ_LEN, STRIDE, MAX_TOKENS, progress=False)
        assert topk.top_k == k and topk.tail_bound > 0
        assert full.mean_kl - topk.tail_bound - 1e-6 <= topk.mean_kl <= full.mean_kl + 1e-6
        assert topk.kl_p99 <= full.kl_p99 + 1e-6  # a percentile of per-token lower bounds
        assert topk.top1 == full.top1 and topk.perplexity == pytest.approx(full.perplexity, rel=1e-9)
        assert topk.reference_perplexity == pytest.approx(full.reference_perplexity, rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref4.safetensors", "ref64.safetensors"]  # no temp left


def test_topk_reference_rejects_other_windows_tokens_and_files(models, tokenizer, tmp_path):
    reference, noisy = models
    path = save_topk_reference(reference, tokenizer, TEXT, tmp_path / "ref.safetensors", 4, SEQ_LEN, STRIDE,
                               MAX_TOKENS, progress=False)
    with pytest.raises(ValueError, match="seq_len=16, stride=6"):
        divergence(noisy, path, tokenizer, TEXT, SEQ_LEN, 8, MAX_TOKENS, progress=False)
    with pytest.raises(ValueError, match="other tokens"):
        divergence(noisy, path, tokenizer, TEXT, SEQ_LEN, STRIDE, MAX_TOKENS - 1, progress=False)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged.safetensors"):
        TopKReference(damaged)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.ones(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.safetensors.*not a lowbit-topk-reference"):
        TopKReference(foreign)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        TopKReference(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="k must be"):
        save_topk_reference(reference, tokenizer, TEXT, tmp_path / "x.safetensors", 0, progress=False)


def test_opposite_order_pairs():
    scores = {"rtn": (-6.3, 0.50), "gptq": (24.1, 0.26), "awq": (1.0, 0.30), "same": (1.0, 0.40)}
    # rtn has the lowest delta and the highest KL; awq and same tie on delta (not a pair); awq < same on KL
    assert opposite_order_pairs(scores) == [("rtn", "gptq"), ("rtn", "awq"), ("rtn", "same"), ("awq", "gptq"),
                                            ("same", "gptq")]
