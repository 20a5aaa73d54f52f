"""A short run of the HTTP load test (benchmarks/http_load.py): 8 streaming clients for 5 s against a tiny
model, with random aborts and disconnects; no request lost or duplicated, KV back to idle afterwards."""

from __future__ import annotations

import os
import sys

import pytest
from server_proc import launch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # benchmarks/ is not installed; `python -m pytest` from the root has it already
    sys.path.insert(0, ROOT)

from benchmarks.http_load import LoadConfig, run_load  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    s = launch(tiny_llama, tmp_path_factory.mktemp("load"))
    yield s
    s.stop()


def test_short_load_loses_and_duplicates_nothing(server):
    # Aborts and disconnects twice as likely as in the 60 s run, so that 5 s see several of each.
    report = run_load(server.url, LoadConfig(clients=8, duration=5, min_new_tokens=8, max_new_tokens=32,
                                             p_abort=0.25, p_disconnect=0.25, seed=1))
    assert report["violations"] == [], report["violations"][:10]
    assert report["completed"] >= 8 and report["aborted"] >= 2 and report["disconnected"] >= 2, report
    assert report["requests"] == report["completed"] + report["aborted"] + report["disconnected"]
    assert report["disconnects_aborted_by_server"] >= report["disconnected"] // 2  # a leaving client stops its work
    assert report["kv_used_tokens_after"] == report["kv_used_tokens_before"] == 0
    assert report["kv_allocated_bytes_after_flush"] == 0
