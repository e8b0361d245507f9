"""Calibration batches: random token windows of a text, and the forward loop that feeds them."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from lowbit.data.texts import read_texts
from lowbit.progress import progress as progress_bar


def token_stream(tokenizer, texts: str | os.PathLike | list[str]) -> torch.Tensor:
    """The token ids of ``texts`` joined by blank lines (no special tokens added), shape (n,), int64."""
    joined = "\n\n".join(read_texts(texts))
    ids = tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(
    tokenizer,
    texts: str | os.PathLike | list[str],
    num_samples: int = 128,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` windows of ``seq_len`` tokens cut from the token stream of ``texts``.

    Window starts are drawn uniformly (with replacement) from ``[0, n - seq_len]`` by a
    ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched), so the result depends only
    on the arguments. ``texts`` is read by ``lowbit.data.read_texts`` (str, list of str, .txt or .jsonl).

    Returns a list of ``ceil(num_samples / batch_size)`` dicts with ``input_ids`` (int64) and
    ``attention_mask`` (int64 ones), each of shape (batch, seq_len); batch is ``batch_size`` except in
    the last dict, which holds the remainder.
    """
    for name, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    stream = token_stream(tokenizer, texts)
    if len(stream) < seq_len:
        raise ValueError(
            f"texts has {len(stream)} tokens, fewer than seq_len={seq_len} needed for one sample; "
            "pass more text or a smaller seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (num_samples,), generator=generator)
    windows = stream[starts[:, None] + torch.arange(seq_len)]
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


def module_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``model``; CPU for a module without tensors."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def make_forward_loop(
    batches: list[dict[str, torch.Tensor]],
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Callable[[nn.Module], None]:
    """A ``forward_loop(model)`` for ``lowbit.quantize``/``calibrate``: runs ``model(**batch)`` on
    every batch under ``torch.no_grad()``, tensors moved to ``device`` (default: the model's device),
    with a tqdm bar unless ``progress`` is False. Outputs are discarded; the model's train/eval mode is
    left as the caller set it."""
    if not isinstance(batches, list) or not all(isinstance(b, dict) for b in batches):
        raise TypeError("batches must be a list of dicts of tensors (see calibration_batches)")

    def forward_loop(model: nn.Module) -> None:
        target = torch.device(device) if device is not None else module_device(model)
        with torch.no_grad():
            for batch in progress_bar(batches, desc="calibration", disable=not progress, leave=False):
                model(**{name: tensor.to(target) for name, tensor in batch.items()})

    return forward_loop
