"""One intra-op thread for the whole suite (restored afterwards).

The tests use small tensors: a second thread buys little, and on a loaded 2-core CI machine OpenMP
threads spinning against each other made folders 8-50x slower (tests/core: 143 s against 17 s).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
