"""One intra-op thread while tests/core runs (restored afterwards).

These tests use tiny tensors: a second thread buys nothing, and on a loaded 2-core CI machine OpenMP
threads spinning against each other made this folder ~8x slower (143 s against 17 s, load average 8).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
