"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread for every engine test. Tiny models are overhead-bound, so one thread is as fast;
    SmolLM2 is ~1.6x slower uncontended. But on a shared 2-core machine, two OpenMP threads wait at every
    barrier for a descheduled peer: measured 15-40x slower while another process used one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
