"""One intra-op thread while tests/calib runs (restored afterwards): tiny tensors, and on a loaded 2-core
machine spinning OpenMP threads made the tiny-Llama tests several times slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
