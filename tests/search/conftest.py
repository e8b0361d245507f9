"""A tiny Llama (tests/calib/tiny_llama.py), its batches, and one auto_quantize search shared by the tests."""

import pytest
import torch

from lowbit import auto_quantize
from tests.algorithms.tiny_llama import tiny_llama

FORMATS = ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"]


def make_batches(count=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (2, 16), generator=generator) for _ in range(count)]


def forward_step(model, batch):
    return model(batch, labels=batch)


def loss_func(output, batch):
    return output.loss


@pytest.fixture(scope="module")
def batches():
    return make_batches()


@pytest.fixture(scope="module")
def searched(batches):
    """(model, state) of a gradient search at 6.0 bits over NVFP4, FP8 and none."""
    return auto_quantize(tiny_llama(), {"effective_bits": 6.0}, FORMATS, batches, forward_step, loss_func,
                         num_calib_steps=2, num_score_steps=2)
