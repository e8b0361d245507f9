"""One intra-op thread while tests/weight_compression runs (restored afterwards): the tensors are tiny,
and OpenMP threads spinning against each other on a loaded 2-core machine made a forward pass ~50x
slower (the same fixture as tests/core/conftest.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
