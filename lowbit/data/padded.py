"""Calibration batches of separate samples, padded on the left (what ModelOpt's hf_ptq feeds its models).

Left padding keeps every sample's last token at the last position, where a causal model's next-token
prediction is read; the attention mask hides the pads. The tokenizer is only read, never changed: its own
``padding_side`` (saved with an export) stays as it was.
"""

from __future__ import annotations

import os

import torch

from lowbit.data.texts import read_texts


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token id, else its eos id; ValueError when it has neither."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a pad nor an eos token to pad calibration samples with")


def left_padded_batches(
    tokenizer,
    texts: str | os.PathLike | list[str],
    num_samples: int,
    seq_len: int,
    batch_size: int,
) -> list[dict[str, torch.Tensor]]:
    """The first ``num_samples`` non-empty texts, each tokenized on its own (no special tokens added) and cut to
    its first ``seq_len`` tokens, in batches of ``batch_size`` (the last holds the remainder).

    Each batch is padded on the left to its longest sample: ``input_ids`` (batch, L) int64 with the pad id
    (``pad_token_id``) before the tokens, ``attention_mask`` (batch, L) int64, 0 on pads and 1 on tokens.
    ValueError when the texts hold fewer than ``num_samples`` non-empty samples.
    """
    for name, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    samples = []
    for text in read_texts(texts):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:seq_len]
        if ids:
            samples.append(ids)
        if len(samples) == num_samples:
            break
    if len(samples) < num_samples:
        raise ValueError(f"the calibration texts hold {len(samples)} non-empty samples, fewer than "
                         f"num_samples={num_samples}; pass more samples or a smaller --calib-size")
    pad = pad_token_id(tokenizer)
    batches = []
    for first in range(0, num_samples, batch_size):
        group = samples[first:first + batch_size]
        length = max(len(ids) for ids in group)
        input_ids = torch.full((len(group), length), pad, dtype=torch.long)
        mask = torch.zeros((len(group), length), dtype=torch.long)
        for row, ids in enumerate(group):
            input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, length - len(ids):] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches
