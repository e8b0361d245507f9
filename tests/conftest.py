"""Suite-wide fixtures: one intra-op thread (restored afterwards), and grad mode left as each test found it.

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


@pytest.fixture(autouse=True)
def grad_mode_kept(request):
    """Grad mode is thread-global: a test (or lowbit code) that leaves it off breaks later tests far away
    (a no_grad held across a generator's yield did). Fail the test that left it off, by name."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail(f"{request.node.nodeid} left torch's grad mode disabled")
