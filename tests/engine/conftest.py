"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models are overhead-bound: one torch thread is as fast, and on a busy 2-core machine it avoids
    OpenMP barriers waiting for a descheduled second thread (measured: 15-40x slower with two). Tests that
    use the real model (marked slow) keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

