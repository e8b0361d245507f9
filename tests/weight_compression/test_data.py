"""compress_weights' dataset handling: stacking consecutive batch-1 items (``stacked_items``) joins exactly
the stackable runs, keeps every value, and gives the same per-row statistics (Hessians) on a decoder model."""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.gptq import HessianAccumulator
from lowbit.weight_compression.data import forward_loop, stacked_items


def _item(generator: torch.Generator, length: int = 5, **extra) -> dict:
    ids = torch.randint(0, 50, (1, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(3)


def test_runs_are_joined_in_order_up_to_max_batch(generator):
    items = [_item(generator) for _ in range(5)]
    result = stacked_items(items, max_batch=2)
    assert [r["input_ids"].shape[0] for r in result] == [2, 2, 1]
    torch.testing.assert_close(torch.cat([r["input_ids"] for r in result]), torch.cat([i["input_ids"] for i in items]),
                               rtol=0, atol=0)
    assert result[2] is items[4]  # a run of one is the item itself


def test_unstackable_items_stay_in_place_and_split_runs(generator):
    a, b = _item(generator), _item(generator)
    longer = _item(generator, length=7)
    pair = _item(generator)
    pair = {key: torch.cat([value, value]) for key, value in pair.items()}  # batch 2: left alone
    no_tensor = {"text": "x"}
    flagged = _item(generator, use_cache=False)  # another non-tensor value than the next: a new run
    other_flag = _item(generator, use_cache=True)
    reordered = {"attention_mask": a["attention_mask"], "input_ids": a["input_ids"]}
    other_dtype = {"input_ids": a["input_ids"].int(), "attention_mask": a["attention_mask"]}
    as_tuple = (a["input_ids"],)
    bare = a["input_ids"]
    items = [a, b, longer, pair, no_tensor, flagged, other_flag, reordered, other_dtype, as_tuple, bare, a]
    result = stacked_items(items, max_batch=8)
    assert len(result) == len(items) - 1
    assert result[0]["input_ids"].shape == (2, 5)
    assert all(r is i for r, i in zip(result[1:], items[2:], strict=True))


def test_values_are_never_modified(generator):
    items = [_item(generator, use_cache=False) for _ in range(3)]
    before = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in i.items()} for i in items]
    [joined] = stacked_items(items)
    assert joined["use_cache"] is False
    for key in ("input_ids", "attention_mask"):
        assert joined[key].dtype == items[0][key].dtype
        torch.testing.assert_close(joined[key], torch.cat([b[key] for b in before]), rtol=0, atol=0)
    for item, copy in zip(items, before, strict=True):
        assert all(torch.equal(item[k], copy[k]) for k in ("input_ids", "attention_mask"))


@pytest.mark.parametrize("max_batch", [0, -1, 2.0, True])
def test_max_batch_errors(max_batch):
    with pytest.raises(ValueError, match=f"max_batch={max_batch!r}"):
        stacked_items([], max_batch=max_batch)
    with pytest.raises(ValueError, match=f"max_elements={max_batch!r}"):
        stacked_items([], max_elements=max_batch)


def test_stacks_stay_under_max_elements(generator):
    """Items of 100 tokens with a 250-element cap: runs of 2 (200 tokens), never 3 (300)."""
    items = [{"input_ids": torch.randint(0, 50, (1, 100), generator=generator)} for _ in range(5)]
    result = stacked_items(items, max_batch=8, max_elements=250)
    assert [item["input_ids"].shape[0] for item in result] == [2, 2, 1]
    assert torch.equal(torch.cat([item["input_ids"] for item in result]), torch.cat([i["input_ids"] for i in items]))


def test_stacked_batches_give_the_same_hessians(generator):
    """Causal decoder: each linear's input Hessian over all token rows is the same, batch 1 or stacked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=50)
    torch.manual_seed(0)  # transformers initialises from the global RNG; only the test touches it
    model = LlamaForCausalLM(config).eval()
    items = [_item(generator, length=9) for _ in range(7)]

    def hessians(dataset: list) -> dict[str, torch.Tensor]:
        linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
        accumulators = {n: HessianAccumulator(m.in_features) for n, m in linears.items()}
        handles = [m.register_forward_pre_hook(lambda _m, args, n=n: accumulators[n].add(args[0]))
                   for n, m in linears.items()]
        try:
            forward_loop(dataset)(model)
        finally:
            for handle in handles:
                handle.remove()
        return {n: a.hessian for n, a in accumulators.items()}

    single, stacked = hessians(items), hessians(stacked_items(items, max_batch=3))
    for name, hessian in single.items():  # float32 sums in another order: 1e-5 relative
        torch.testing.assert_close(stacked[name], hessian, rtol=1e-5, atol=1e-6 * float(hessian.abs().max()))
