"""lowbit.data: calibration windows (shapes, determinism, inputs, errors), forward loop, bundled texts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from lowbit.assets import default_model_path
from lowbit.data import (
    calibration_batches,
    default_calibration_text,
    default_eval_text,
    make_forward_loop,
    read_texts,
    token_stream,
)

PARAGRAPHS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be.",
    "Call me Ishmael. Some years ago--never mind how long precisely--having little or no money in my "
    "purse, and nothing particular to interest me on shore, I thought I would sail about a little.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


def test_batches_have_the_requested_shapes(tokenizer):
    batches = calibration_batches(tokenizer, PARAGRAPHS, num_samples=10, seq_len=16, batch_size=4)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(4, 16), (4, 16), (2, 16)]
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask"}
        assert batch["input_ids"].dtype == torch.int64
        assert torch.equal(batch["attention_mask"], torch.ones_like(batch["input_ids"]))


def test_windows_are_contiguous_slices_of_the_token_stream(tokenizer):
    stream = token_stream(tokenizer, PARAGRAPHS).tolist()
    slices = {tuple(stream[i : i + 12]) for i in range(len(stream) - 11)}
    batches = calibration_batches(tokenizer, PARAGRAPHS, num_samples=20, seq_len=12, batch_size=8)
    rows = [tuple(row.tolist()) for b in batches for row in b["input_ids"]]
    assert len(rows) == 20 and all(row in slices for row in rows)
    assert len(set(rows)) > 5  # starts are spread, not one window repeated


def test_batches_are_deterministic_and_leave_the_global_rng_alone(tokenizer):
    state = torch.get_rng_state()
    first = calibration_batches(tokenizer, PARAGRAPHS, num_samples=6, seq_len=8, seed=3)
    again = calibration_batches(tokenizer, PARAGRAPHS, num_samples=6, seq_len=8, seed=3)
    other = calibration_batches(tokenizer, PARAGRAPHS, num_samples=6, seq_len=8, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0]["input_ids"], again[0]["input_ids"])
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])


def test_txt_and_jsonl_files_read_like_strings(tokenizer, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text(PARAGRAPHS[0], encoding="utf-8")
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(PARAGRAPHS)) + "\n\n")
    assert read_texts(txt) == read_texts(str(txt)) == [PARAGRAPHS[0]]
    assert read_texts(jsonl) == read_texts(str(jsonl)) == PARAGRAPHS
    from_file = calibration_batches(tokenizer, jsonl, num_samples=4, seq_len=8, seed=1)
    from_list = calibration_batches(tokenizer, PARAGRAPHS, num_samples=4, seq_len=8, seed=1)
    assert torch.equal(from_file[0]["input_ids"], from_list[0]["input_ids"])
    prose = "a sentence that mentions file.txt\nand goes on"
    assert read_texts(prose) == [prose]


def test_bad_files_are_named_in_the_error(tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_texts(bad_jsonl)
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        read_texts(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(TypeError, match="list of str"):
        read_texts(["ok", 3])
    with pytest.raises(TypeError, match="texts"):
        read_texts(42)


def test_too_short_text_names_the_parameters(tokenizer):
    with pytest.raises(ValueError, match=r"tokens, fewer than seq_len=256"):
        calibration_batches(tokenizer, "Too short.", seq_len=256)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [({"num_samples": 0}, ValueError, "num_samples"), ({"seq_len": 2.5}, ValueError, "seq_len"),
     ({"batch_size": True}, ValueError, "batch_size"), ({"seed": "0"}, TypeError, "seed")],
)
def test_bad_sizes_are_rejected(tokenizer, kwargs, error, message):
    with pytest.raises(error, match=message):
        calibration_batches(tokenizer, PARAGRAPHS, **kwargs)


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.seen: list[tuple[torch.Tensor, bool]] = []

    def forward(self, input_ids, attention_mask):
        self.seen.append((input_ids, torch.is_grad_enabled()))
        return (input_ids * self.weight).sum()


def test_forward_loop_feeds_every_batch_without_grad(tokenizer):
    batches = calibration_batches(tokenizer, PARAGRAPHS, num_samples=5, seq_len=8, batch_size=2)
    model = _Recorder()
    make_forward_loop(batches, progress=False)(model)
    assert [ids.shape[0] for ids, _ in model.seen] == [2, 2, 1]
    for (ids, grad_enabled), batch in zip(model.seen, batches, strict=True):
        assert torch.equal(ids, batch["input_ids"]) and not grad_enabled
    with pytest.raises(TypeError, match="batches"):
        make_forward_loop(batches[0])


def test_bundled_texts_are_sized_and_share_no_document():
    calibration, heldout = default_calibration_text(), default_eval_text()
    assert 100_000 <= len(calibration) <= 300_000 and 100_000 <= len(heldout) <= 300_000
    long_paragraphs = [{p for p in text.split("\n\n") if len(p) > 300} for text in (calibration, heldout)]
    assert long_paragraphs[0] and long_paragraphs[1] and not long_paragraphs[0] & long_paragraphs[1]
