"""lowbit.scale.memory: a block's reserved host bytes follow the documented formula, counted here from the block's
shapes (a Llama block on the meta device: no weights), and an algorithm without a measurement gets the largest
measured figures with a warning naming it."""

import dataclasses
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.config import parse_config
from lowbit.scale.memory import RUN_OVERHEAD, TEMPORARIES, block_memory

HIDDEN, INTERMEDIATE, KV_WIDTH = 128, 384, 64


@pytest.fixture(scope="module")
def block():
    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    parsed = parse_config(lowbit.get_preset("INT4_AWQ_CFG"))
    lowbit.quantize(model, dataclasses.replace(parsed, algorithm=None, algorithm_options={}))
    return model.model.layers[0]


def _numel() -> int:  # q, o; k, v; gate, up, down; two norms
    return 2 * HIDDEN * HIDDEN + 2 * KV_WIDTH * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN


@pytest.mark.parametrize("algorithm", ["max", "awq_lite", "gptq"])
@pytest.mark.parametrize("tokens", [256, 10_000])
def test_block_memory_is_the_documented_sum(block, algorithm, tokens):
    batch_tokens = 128
    forward = batch_tokens * (5 * INTERMEDIATE + 8 * HIDDEN) * 4  # float32 activations of one batch
    rows = min(tokens, 4096)  # AWQ's max_tokens default
    kept = {"max": 0,
            "awq_lite": rows * (6 * HIDDEN + INTERMEDIATE + INTERMEDIATE) * 4 + INTERMEDIATE ** 2 * 4,
            "gptq": INTERMEDIATE ** 2 * (8 + 8 + 4 * 4)}[algorithm]
    peak = block_memory(block, algorithm, {}, tokens, batch_tokens)
    assert peak.weights == 2 * _numel()
    assert peak.temporaries == int(TEMPORARIES[algorithm] * 4 * _numel())
    assert (peak.forward, peak.kept) == (forward, kept)
    assert peak.total == 2 * _numel() + peak.temporaries + max(forward, kept) + RUN_OVERHEAD


def test_awq_sample_size_follows_its_option(block):
    small = block_memory(block, "awq_lite", {"max_tokens": 100}, 10_000, 128)
    assert small.kept == 100 * (6 * HIDDEN + 2 * INTERMEDIATE) * 4 + INTERMEDIATE ** 2 * 4


def test_unmeasured_algorithm_takes_the_largest_figures_with_a_warning(block, caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit.scale.memory"):
        peak = block_memory(block, "awq_full", {}, 10_000, 128)
    assert "'awq_full'" in caplog.text and "not measured" in caplog.text
    measured = [block_memory(block, name, {}, 10_000, 128) for name in TEMPORARIES]
    assert peak.temporaries == max(m.temporaries for m in measured)
    assert peak.kept == max(m.kept for m in measured)
