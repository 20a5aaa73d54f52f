"""Smoke test of benchmarks/adaptive_rollout.py on a tiny random model with a random drafter."""

from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # benchmarks/ is not installed; `python -m pytest` from the root has it already
    sys.path.insert(0, ROOT)


def test_adaptive_bench_writes_json_and_timeline(tiny_models, tmp_path):
    import tlt
    from benchmarks import adaptive_rollout
    from tlt.engine.spec.drafter import EagleDrafter

    e = tlt.Engine(tiny_models["llama"], dtype="float32")
    drafter = str(tmp_path / "drafter")
    EagleDrafter.random(e.model_config, seed=0, draft_vocab_size=4096).save(drafter)
    e.shutdown()
    out = tmp_path / "adaptive.json"
    threads = torch.get_num_threads()
    try:
        adaptive_rollout.main(["--json", str(out), "--model-path", tiny_models["llama"], "--drafter", drafter,
                               "--dtype", "float32", "--prompts", "3", "--n", "2", "--min-tokens", "4",
                               "--max-tokens", "24", "--arms", "s2k1n3,s3k2n5", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    for key in ("speedup_total", "speedup_tail", "vs_best_static", "best_static", "runs", "workload", "machine"):
        assert key in res
    assert [r["mode"] for r in res["runs"]] == ["off", "adaptive", "s2k1n3", "s3k2n5"]
    assert [len(r["repeats_total_s"]) for r in res["runs"]] == [2, 2, 1, 1]  # off and adaptive run twice
    tokens = {r["tokens"] for r in res["runs"]}
    assert len(tokens) == 1  # float32, seeded: every run emits the same samples
    assert all(r["identical_to_off"] == 1.0 for r in res["runs"])
    assert set(res["runs"][0]["arm_rounds"]) == {"off"} and set(res["runs"][2]["arm_rounds"]) == {"s2k1n3"}
    assert os.path.exists(res["plot"])
