"""Perplexity of a causal language model on a text, by Hugging Face's sliding-window method.

``scored_windows`` is the one loop over the windows: it yields each window's next-token log-probabilities
at the positions it scores, which ``perplexity`` here and ``lowbit.eval.divergence`` consume.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch import nn

from lowbit.data.calibration import module_device, token_stream
from lowbit.progress import progress as progress_bar

WINDOWS_PER_FORWARD = 8


def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` for each window of the sliding-window method.

    Windows start at ``0, stride, 2*stride, ...`` and span ``[begin, min(begin + seq_len, n))``; the last
    one reaches ``n``. Each window scores the tokens ``[first_scored, end)``: those after the previous
    window's end, but never the window's own first token, which has no context in it. With
    ``stride < seq_len`` every token but token 0 is scored exactly once, with at least
    ``seq_len - stride`` tokens of context after the first window; with ``stride == seq_len``
    (no overlap) the first token of every window goes unscored, as in Hugging Face's loop.
    """
    windows, scored_until, begin = [], 1, 0
    while True:
        end = min(begin + seq_len, num_tokens)
        windows.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == num_tokens:
            return windows
        begin += stride


def text_tokens(tokenizer, text: str | os.PathLike, seq_len: int, stride: int, max_tokens: int | None) -> torch.Tensor:
    """The token ids to score, after checking the window arguments: ``text`` (a str, or a .txt / .jsonl
    path) tokenized without special tokens, its first ``max_tokens`` kept; int64, shape (n,), n >= 2."""
    for name, value, least in (("seq_len", seq_len, 2), ("stride", stride, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if stride > seq_len:
        raise ValueError(f"stride must be <= seq_len so that no token is skipped, got {stride} > {seq_len}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 2):
        raise ValueError(f"max_tokens must be None or an int >= 2, got {max_tokens!r}")
    if not isinstance(text, (str, os.PathLike)):
        raise TypeError(f"text must be a str or a path to a .txt / .jsonl file, got {type(text).__name__}")
    tokens = token_stream(tokenizer, text)[:max_tokens]
    if len(tokens) < 2:
        raise ValueError(f"text has {len(tokens)} tokens; perplexity needs at least 2")
    return tokens


def scored_windows(model: nn.Module, tokens: torch.Tensor, seq_len: int, stride: int, progress: bool = True,
                   desc: str = "perplexity") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(log_probs, targets)`` for each window of ``sliding_windows(len(tokens), seq_len, stride)``, in order.

    ``log_probs`` has shape ``(end - first_scored, vocab)``: ``log softmax(logits[t - 1])`` for each scored
    token t, in the logits' dtype promoted to at least float32, on the model's device; ``targets`` holds
    the tokens t (int64, same device). Only one forward's logits are alive at a time: full-length windows
    go through the model ``WINDOWS_PER_FORWARD`` at a time. Each forward runs under ``torch.no_grad()`` (the
    caller's grad mode is untouched between yields) in eval mode (the model's mode is restored when the
    generator finishes or is closed).
    """
    device = module_device(model)
    windows = sliding_windows(len(tokens), seq_len, stride)
    was_training = model.training
    model.eval()
    try:
        with progress_bar(total=len(windows), desc=desc, disable=not progress, leave=False) as bar:
            for group in _group_equal_lengths(windows, WINDOWS_PER_FORWARD):
                inputs = torch.stack([tokens[begin:end] for begin, end, _ in group]).to(device)
                with torch.no_grad():  # never across a yield: grad mode is the caller's thread state
                    logits = model(input_ids=inputs, use_cache=False).logits
                    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
                    del logits
                for row, (begin, end, first) in enumerate(group):
                    yield log_probs[row, first - begin - 1 : end - begin - 1], inputs[row, first - begin :]
                    bar.update(1)
    finally:
        model.train(was_training)


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str | os.PathLike,
    seq_len: int = 256,
    stride: int = 128,
    max_tokens: int | None = None,
    progress: bool = True,
) -> float:
    """``exp(mean NLL)`` of ``text`` under ``model``, over the tokens the sliding windows score.

    The text is tokenized without special tokens (``max_tokens`` keeps only that many leading tokens)
    and scored with ``sliding_windows(n, seq_len, stride)``: the NLL of token t is
    ``-log softmax(logits[t - 1])[token t]`` from the window that scores t (``scored_windows``).
    Log-probabilities are computed in the logits' dtype promoted to at least float32 and summed in float64.
    Runs on the model's device under ``torch.no_grad()``, in eval mode (the mode is restored afterwards).
    """
    tokens = text_tokens(tokenizer, text, seq_len, stride, max_tokens)
    total_nll, scored = 0.0, 0
    for log_probs, targets in scored_windows(model, tokens, seq_len, stride, progress):
        total_nll -= log_probs.gather(-1, targets[:, None]).double().sum().item()
        scored += len(targets)
    return math.exp(total_nll / scored)


def _group_equal_lengths(windows: list[tuple[int, int, int]], size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, at most ``size`` per group (one forward pass each)."""
    groups: list[list[tuple[int, int, int]]] = []
    for window in windows:
        last = groups[-1] if groups else None
        if last and len(last) < size and last[0][1] - last[0][0] == window[1] - window[0]:
            last.append(window)
        else:
            groups.append([window])
    return groups
