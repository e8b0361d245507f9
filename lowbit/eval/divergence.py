"""How far a model's next-token distributions are from a reference's (the float model): KL, top-1, perplexity.

At each position t that the sliding windows score (``lowbit.eval.perplexity.sliding_windows``), P_t is the
reference's next-token distribution and Q_t the model's, both ``softmax`` of the logits at t - 1 over the
vocabulary V. Per position, in nats:

    KL_t = KL(P_t || Q_t) = sum_v p_v (log p_v - log q_v)       >= 0 (Gibbs' inequality), 0 iff P_t = Q_t

``divergence`` returns the mean of KL_t over the scored positions, its 99th percentile (linear
interpolation between order statistics, numpy's default), the top-1 agreement (the share of positions
where ``argmax P_t == argmax Q_t``), and both models' perplexities ``exp(mean_t -log q_t(token t))``.

Why KL and not the perplexity delta: the delta compares two averages of the log-probability of the one token
that happened to come next, so quantization noise that suits a text can lower perplexity; KL compares the
whole distributions position by position, cannot go below zero and grows with the error.

The reference is either a model, run window by window on the same inputs beside ``model`` (only one group
of windows' log-probabilities of each model is alive at a time), or a file of its top-k log-probabilities
written by ``lowbit.eval.topk.save_topk_reference``; then KL_t is replaced by the lower bound of
``lowbit.eval.topk.topk_kl_bounds`` and the mean gap to its upper bound is reported as ``tail_bound``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lowbit.eval.perplexity import scored_windows, text_tokens
from lowbit.eval.topk import TopKReference, topk_kl_bounds

KL_PERCENTILE = 99.0


def token_kl(reference_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q)`` per row, in nats, over the last axis: shapes ``(..., V)`` -> ``(...)``, from the reference's
    log-probabilities ``a_v = log p_v`` and the model's ``b_v = log q_v``.

    Summed term by term as ``sum_v [p_v (a_v - b_v) - (p_v - q_v)]``: equal to ``sum_v p_v (a_v - b_v)`` since
    both distributions sum to 1, with every term ``q (r log r - r + 1) >= 0`` (r = p_v / q_v). Each term is
    clamped at 0, its exact sign, so rounding never makes a row negative; ``p_v - q_v`` is computed as
    ``q_v expm1(a_v - b_v)`` where ``|a_v - b_v| < 1`` (no cancellation when the two are close). Terms with
    ``p_v = 0`` are ``q_v``; ``p_v > 0`` with ``q_v = 0`` makes the row ``inf``. Computed in the inputs'
    common dtype promoted to at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(reference_log_probs.dtype, log_probs.dtype), torch.float32)
    reference, model = reference_log_probs.to(dtype), log_probs.to(dtype)
    p, q = reference.exp(), model.exp()
    log_ratio = reference - model
    close = log_ratio.abs() < 1
    difference = torch.where(close, q * torch.expm1(torch.where(close, log_ratio, 0.0)), p - q)
    terms = torch.where(p > 0, p * log_ratio - difference, q)
    return terms.clamp_min(0).sum(-1)


@dataclass(frozen=True)
class Divergence:
    """The scores of one model against a reference over ``tokens`` scored positions.

    ``mean_kl``, ``kl_p99``: nats per token (with a top-k reference, of the per-token lower bound);
    ``top1``: share in [0, 1]; ``tail_bound``: with a top-k reference, the mean per token of the gap between
    the upper and lower bound of KL_t, so the full mean KL lies in ``[mean_kl, mean_kl + tail_bound]``
    (0.0 with a model as reference: exact); ``top_k``: the k of the reference file, None for a model.
    """

    perplexity: float
    reference_perplexity: float
    mean_kl: float
    kl_p99: float
    top1: float
    tokens: int
    tail_bound: float = 0.0
    top_k: int | None = None

    @property
    def perplexity_delta(self) -> float:
        return self.perplexity - self.reference_perplexity


class _Totals:
    """Per-window sums: the per-token KL values are kept (one float64 each) for the percentile."""

    def __init__(self) -> None:
        self.kl: list[np.ndarray] = []
        self.gap = self.nll = self.reference_nll = 0.0
        self.agree = 0

    def add(self, kl: torch.Tensor, gap: torch.Tensor, agree: torch.Tensor, log_probs: torch.Tensor,
            reference_target_log_probs: torch.Tensor, targets: torch.Tensor) -> None:
        self.kl.append(kl.double().cpu().numpy())
        self.gap += gap.double().sum().item()
        self.agree += int(agree.sum().item())
        self.nll -= log_probs.gather(-1, targets[:, None]).double().sum().item()
        self.reference_nll -= reference_target_log_probs.double().sum().item()

    def result(self, top_k: int | None) -> Divergence:
        kl = np.concatenate(self.kl)
        count = len(kl)
        return Divergence(
            perplexity=math.exp(self.nll / count), reference_perplexity=math.exp(self.reference_nll / count),
            mean_kl=float(kl.mean()), kl_p99=float(np.percentile(kl, KL_PERCENTILE)), top1=self.agree / count,
            tokens=count, tail_bound=self.gap / count, top_k=top_k,
        )


def divergence(
    model: nn.Module,
    reference: nn.Module | str | os.PathLike | TopKReference,
    tokenizer,
    text: str | os.PathLike,
    seq_len: int = 256,
    stride: int = 128,
    max_tokens: int | None = None,
    progress: bool = True,
) -> Divergence:
    """``model`` scored against ``reference`` on ``text`` (see the module docstring for the math).

    ``reference``: a model (same tokenizer and vocabulary; run beside ``model`` on every window, exact
    KL) or a top-k reference file (a path or an open ``TopKReference``; it must have been written for
    the same tokens, ``seq_len`` and ``stride``). The arguments are those of ``lowbit.eval.perplexity``;
    statistics are computed on ``model``'s device and summed in float64.
    """
    tokens = text_tokens(tokenizer, text, seq_len, stride, max_tokens)
    if isinstance(reference, (str, os.PathLike)):
        reference = TopKReference(reference)
    totals = _Totals()
    windows = scored_windows(model, tokens, seq_len, stride, progress, desc="divergence")
    if isinstance(reference, TopKReference):
        reference.check_matches(tokens, seq_len, stride)
        for (log_probs, targets), stored in zip(windows, reference.windows(), strict=True):
            stored = stored.to(log_probs.device)
            lower, upper = topk_kl_bounds(stored.top_log_probs, stored.top_indices, stored.log_tail_mass, log_probs)
            agree = stored.top_indices[:, 0] == log_probs.argmax(-1)
            totals.add(lower, upper - lower, agree, log_probs, stored.target_log_probs, targets)
        return totals.result(reference.k)
    if not isinstance(reference, nn.Module):
        raise TypeError(f"reference must be a torch.nn.Module or a top-k reference file path, got "
                        f"{type(reference).__name__}")
    reference_windows = scored_windows(reference, tokens, seq_len, stride, progress=False)
    for (log_probs, targets), (reference_log_probs, _) in zip(windows, reference_windows, strict=True):
        reference_log_probs = reference_log_probs.to(log_probs.device)
        if reference_log_probs.shape != log_probs.shape:
            raise ValueError(f"reference gives log-probabilities of shape {tuple(reference_log_probs.shape)}, "
                             f"the model {tuple(log_probs.shape)}: both must share one vocabulary")
        kl = token_kl(reference_log_probs, log_probs)
        agree = reference_log_probs.argmax(-1) == log_probs.argmax(-1)
        totals.add(kl, torch.zeros_like(kl), agree, log_probs,
                   reference_log_probs.gather(-1, targets[:, None])[:, 0], targets)
    return totals.result(None)


def opposite_order_pairs(scores: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    """Pairs ``(a, b)`` of names that perplexity delta and KL rank in opposite order: ``delta_a < delta_b``
    while ``kl_a > kl_b`` (strictly), from ``scores[name] = (perplexity delta, mean KL)``; in the order of
    ``scores``, ``a`` being the one with the lower delta."""
    names = list(scores)
    pairs = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            (delta_a, kl_a), (delta_b, kl_b) = scores[first], scores[second]
            if (delta_a - delta_b) * (kl_a - kl_b) < 0:
                pairs.append((first, second) if delta_a < delta_b else (second, first))
    return pairs
