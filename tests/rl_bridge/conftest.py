"""Fixtures of the RL-bridge tests (the server launcher lives in server_proc.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]
