"""A reference model's top-k next-token log-probabilities in a file, and the KL bounds they give.

For a model too large to keep beside its quantized copy, a first pass (``save_topk_reference``) stores, for
every scored position t (the sliding windows of ``lowbit.eval.perplexity``), the reference's k largest
log-probabilities ``log p_s`` (s in S_t, sorted descending), their token ids, the log of the tail mass
``m = P(V \\ S_t) = sum_{v not in S_t} p_v`` and the log-probability of the token that follows. The second pass
(``lowbit.eval.divergence.divergence`` with the file as reference) reads them window by window.

File: safetensors, written to a temporary file beside the target and renamed into place. Tensors: ``tokens``
(int64, (n,)): the token ids scored; ``top_log_probs`` (float32, (N, k)); ``top_indices`` (int32, (N, k));
``log_tail_mass`` (float32, (N,)); ``target_log_probs`` (float32, (N,)), N the scored positions. Size:
``8 n + 4 N (2 k + 2)`` bytes plus a small header. Metadata: ``format``, ``version``, ``k``, ``vocab_size``,
``seq_len``, ``stride``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.eval.perplexity import scored_windows, sliding_windows, text_tokens
from lowbit.files import atomic_file

FORMAT = "lowbit-topk-reference"
VERSION = "1"
TENSORS = ("tokens", "top_log_probs", "top_indices", "log_tail_mass", "target_log_probs")


def topk_kl_bounds(top_log_probs: torch.Tensor, top_indices: torch.Tensor, log_tail_mass: torch.Tensor,
                   log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lower, upper)`` bounds of ``KL(P || Q)`` per position from the reference's top-k and the model's full
    log-probabilities; shapes ``(N, k)``, ``(N, k)``, ``(N,)``, ``(N, V)`` -> two ``(N,)`` float64.

    With S the stored top-k tokens, T = V \\ S the tail, m = P(T), Q(T) = sum_{v in T} q_v:

    - lower = sum_{s in S} p_s log(p_s / q_s) + m log(m / Q(T)): the KL of P and Q merged into the k
      tokens plus one tail bucket. Merging outcomes never increases KL (data-processing inequality; here the
      log-sum inequality on the tail), so lower <= KL. The difference is ``m KL(P_T || Q_T)`` (chain rule,
      P_T and Q_T the distributions within the tail), unknown since the file lacks P_T.
    - upper = sum_{s in S} p_s log(p_s / q_s) + max of ``sum_{v in T} p_v log(p_v / q_v)`` over every tail the
      file allows: 0 <= p_v <= c (c = min_{s in S} p_s, as S holds the k largest) and sum p_v = m. The sum is
      convex in p, so its maximum lies at a vertex of that polytope: floor(m / c) tail tokens at c and one at
      the remainder r = m - floor(m / c) c, all vertices sharing ``sum p log p``; by the rearrangement
      inequality the c's go to the tail tokens of smallest q and r to the next. upper >= KL, and no tighter
      bound follows from the file.

    Both are exact up to the file's float32 rounding. An empty tail (k = V, m = 0) gives lower = upper = KL.
    """
    top, indices, log_tail = top_log_probs.double(), top_indices.long(), log_tail_mass.double()
    probabilities = top.exp()
    head_terms = probabilities * (top - log_probs.gather(-1, indices).double())
    head = torch.where(probabilities > 0, head_terms, torch.zeros_like(head_terms)).sum(-1)
    tail_size = log_probs.shape[-1] - indices.shape[-1]
    if tail_size == 0:
        return head, head
    tail_mass = log_tail.exp()
    tail_log_probs = log_probs.scatter(-1, indices, -math.inf)  # the model's log q_v, -inf on S
    lower_tail = tail_mass * (log_tail - torch.logsumexp(tail_log_probs, -1).double())
    lower = head + torch.where(tail_mass > 0, lower_tail, torch.zeros_like(lower_tail))

    cap = probabilities[:, -1]
    full = torch.floor(tail_mass / cap).clamp(0, tail_size)
    remainder = (tail_mass - full * cap).clamp_min(0)
    full_count = full.long()
    needed = min(tail_size, int(full_count.max()) + 1)  # the largest -log q_v that the maximum uses
    surprisal = (-log_probs).scatter(-1, indices, -math.inf)  # -log q_v on the tail, -inf on S: sorts last
    surprisal = surprisal.topk(needed, dim=-1).values.double()  # descending
    prefix = torch.cat([torch.zeros_like(surprisal[:, :1]), surprisal.cumsum(-1)], -1)
    at_cap = full * torch.special.xlogy(cap, cap) + cap * prefix.gather(-1, full_count[:, None])[:, 0]
    next_surprisal = surprisal.gather(-1, full_count.clamp(max=needed - 1)[:, None])[:, 0]
    at_remainder = torch.special.xlogy(remainder, remainder) + torch.where(
        remainder > 0, remainder * next_surprisal, torch.zeros_like(remainder))
    return lower, head + at_cap + at_remainder


@dataclass(frozen=True)
class StoredWindow:
    """One window's slice of a top-k reference file (see the module docstring)."""

    top_log_probs: torch.Tensor
    top_indices: torch.Tensor
    log_tail_mass: torch.Tensor
    target_log_probs: torch.Tensor

    def to(self, device: torch.device) -> StoredWindow:
        return StoredWindow(*(tensor.to(device) for tensor in
                              (self.top_log_probs, self.top_indices, self.log_tail_mass, self.target_log_probs)))


def save_topk_reference(model: nn.Module, tokenizer, text: str | os.PathLike, path: str | os.PathLike, k: int,
                        seq_len: int = 256, stride: int = 128, max_tokens: int | None = None,
                        progress: bool = True) -> Path:
    """Write ``model``'s top-``k`` log-probabilities on ``text`` to ``path`` (layout in the module docstring).

    The window arguments are those of ``lowbit.eval.perplexity``; the second pass must use the same ones.
    The stored rows are gathered in memory (``4 N (2 k + 2)`` bytes) and written once, to a temporary file
    beside ``path`` renamed over it, so a reader never sees half a file. Returns the path.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    tokens = text_tokens(tokenizer, text, seq_len, stride, max_tokens)
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in TENSORS[1:]}
    vocab_size = None
    for log_probs, targets in scored_windows(model, tokens, seq_len, stride, progress, desc="top-k reference"):
        vocab_size = log_probs.shape[-1]
        if k > vocab_size:
            raise ValueError(f"k={k} exceeds the model's vocabulary of {vocab_size} tokens")
        top = log_probs.topk(k, dim=-1)
        tail = log_probs.scatter(-1, top.indices, -math.inf)
        columns["top_log_probs"].append(top.values.float().cpu())
        columns["top_indices"].append(top.indices.int().cpu())
        columns["log_tail_mass"].append(torch.logsumexp(tail, -1).float().cpu())
        columns["target_log_probs"].append(log_probs.gather(-1, targets[:, None])[:, 0].float().cpu())
    tensors = {"tokens": tokens.contiguous(), **{name: torch.cat(parts) for name, parts in columns.items()}}
    metadata = {"format": FORMAT, "version": VERSION, "k": str(k), "vocab_size": str(vocab_size),
                "seq_len": str(seq_len), "stride": str(stride)}
    with atomic_file(path, overwrite=True) as staging:
        save_file(tensors, staging, metadata=metadata)
    return Path(path)


class TopKReference:
    """A top-k reference file opened for reading: its metadata checked on opening, its rows read one window
    at a time (``windows()``), so memory holds one window's rows, not the file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"reference file {str(self.path)!r} does not exist")
        try:
            with safe_open(self.path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
                self.tokens = handle.get_tensor("tokens") if "tokens" in shapes else None
        except Exception as error:  # safetensors raises its own types for a damaged header
            raise ValueError(f"reference file {str(self.path)!r} is not a readable safetensors file: {error}") \
                from error
        if metadata.get("format") != FORMAT or set(shapes) != set(TENSORS):
            raise ValueError(f"reference file {str(self.path)!r} is not a {FORMAT} (metadata format "
                             f"{metadata.get('format')!r}, tensors {sorted(shapes)}); write one with "
                             "lowbit.eval.topk.save_topk_reference or `lowbit eval --save-reference`")
        if metadata.get("version") != VERSION:
            raise ValueError(f"reference file {str(self.path)!r} has version {metadata.get('version')!r}; "
                             f"this lowbit reads version {VERSION}")
        self.k, self.vocab_size = int(metadata["k"]), int(metadata["vocab_size"])
        self.seq_len, self.stride = int(metadata["seq_len"]), int(metadata["stride"])
        self.positions = sum(end - first for _, end, first in sliding_windows(len(self.tokens), self.seq_len,
                                                                               self.stride))
        expected = {"tokens": (len(self.tokens),), "top_log_probs": (self.positions, self.k),
                    "top_indices": (self.positions, self.k), "log_tail_mass": (self.positions,),
                    "target_log_probs": (self.positions,)}
        if shapes != expected:
            raise ValueError(f"reference file {str(self.path)!r} is corrupt: tensor shapes {shapes}, "
                             f"expected {expected} for its metadata")

    @property
    def nbytes(self) -> int:
        """The file's size on disk."""
        return self.path.stat().st_size

    def check_matches(self, tokens: torch.Tensor, seq_len: int, stride: int) -> None:
        """ValueError unless the file was written for these tokens and windows."""
        if (seq_len, stride) != (self.seq_len, self.stride):
            raise ValueError(f"reference file {str(self.path)!r} was written with seq_len={self.seq_len}, "
                             f"stride={self.stride}; this evaluation uses seq_len={seq_len}, stride={stride}")
        if not torch.equal(tokens, self.tokens):
            raise ValueError(f"reference file {str(self.path)!r} was written for other tokens ({len(self.tokens)} "
                             f"stored, {len(tokens)} here): use the same text, tokenizer and max_tokens")

    def windows(self) -> Iterator[StoredWindow]:
        """The stored rows of each window of ``sliding_windows``, in order."""
        with safe_open(self.path, framework="pt") as handle:
            slices = [handle.get_slice(name) for name in TENSORS[1:]]
            row = 0
            for _, end, first in sliding_windows(len(self.tokens), self.seq_len, self.stride):
                count = end - first
                yield StoredWindow(*(part[row : row + count] for part in slices))
                row += count
