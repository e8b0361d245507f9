"""Fixtures of the layer-wise algorithm tests: the tiny Llama of ``tiny_llama.py`` and three token batches."""

import pytest
import torch

from .tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 12), generator=generator) for _ in range(3)]
