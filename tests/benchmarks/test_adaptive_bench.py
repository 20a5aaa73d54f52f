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
    for key in ("speedup_total", "speedup_tail", "vs_best_static", "best_static", "oracle_total", "oracle_tail", "runs",
                "workload", "machine"):
        assert key in res
    assert [r["mode"] for r in res["runs"]] == ["off", "adaptive", "s2k1n3", "s3k2n5"]
    assert [len(r["repeats_total_s"]) for r in res["runs"]] == [2, 2, 1, 1]  # off and adaptive run twice
    tokens = {r["tokens"] for r in res["runs"]}
    assert len(tokens) == 1  # float32, seeded: every run emits the same samples
    assert all(r["identical_to_off"] == 1.0 for r in res["runs"])
    assert set(res["runs"][0]["arm_rounds"]) == {"off"} and set(res["runs"][2]["arm_rounds"]) == {"s2k1n3"}
    assert os.path.exists(res["plot"])


def test_oracle_bound_takes_the_fastest_static_run_per_batch_size():
    """off: 2 rounds at batch 4 (4 tokens, 0.1 s each) and 2 at batch 1 (1 token, 0.05 s each) within 1.0 s in all
    (0.7 s outside rounds). A chain doubles goodput at batch 1 and halves it at 4; a tree is worse everywhere. The
    oracle keeps plain decoding at 4 and the chain at 1: 1.0 s -> 0.95 s overall, tail (<= 1 sequence) 0.1 -> 0.05 s."""
    from benchmarks.adaptive_rollout import oracle_bound

    off = {"mode": "off", "total_s": 1.0, "tail_s": 0.1,
           "timeline": [[0.0, "off", 4, 4, 0.1], [0.1, "off", 4, 4, 0.1],
                        [0.2, "off", 1, 1, 0.05], [0.25, "off", 1, 1, 0.05]]}
    chain = {"mode": "s2k1n3", "total_s": 9.9, "tail_s": 9.9,
             "timeline": [[0.0, "s2k1n3", 4, 8, 0.4], [0.4, "s2k1n3", 1, 2, 0.05]]}
    tree = {"mode": "s4k2n8", "total_s": 9.9, "tail_s": 9.9,
            "timeline": [[0.0, "s4k2n8", 4, 4, 1.0], [1.0, "s4k2n8", 1, 1, 0.5]]}
    adaptive = {"mode": "adaptive", "total_s": 0.1, "tail_s": 0.0, "timeline": [[0.0, "s2k1n3", 1, 100, 0.001]]}
    res = oracle_bound([off, adaptive, chain, tree], tail=1)
    assert abs(res["total"] - 1.0 / 0.95) < 1e-9 and abs(res["tail"] - 2.0) < 1e-9
    assert oracle_bound([off], tail=1) == {"total": 1.0, "tail": 1.0}
