"""Smoke test of benchmarks/spec_decoding.py on a tiny random model with a random drafter."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # benchmarks/ is not installed; `python -m pytest` from the root has it already
    sys.path.insert(0, ROOT)


@pytest.fixture
def drafter_dir(tiny_models, tmp_path):
    import tlt
    from tlt.engine.spec.drafter import EagleDrafter

    e = tlt.Engine(tiny_models["llama"], dtype="float32")
    d = str(tmp_path / "drafter")
    EagleDrafter.random(e.model_config, seed=0, draft_vocab_size=4096).save(d)
    e.shutdown()
    return d


def test_spec_bench_writes_json_and_plot(tiny_models, drafter_dir, tmp_path):
    from benchmarks import spec_decoding

    out = tmp_path / "spec.json"
    threads = torch.get_num_threads()
    try:
        spec_decoding.main(["--json", str(out), "--model-path", tiny_models["llama"], "--drafter", drafter_dir,
                            "--dtype", "float32", "--batch-sizes", "1,2", "--configs", "2,1", "2,2,4",
                            "--new-tokens", "6", "--min-prompts", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    for key in ("speedup_bs1", "accept_len_bs1", "best_config_bs1", "table", "greedy_identical_frac",
                "sampled_identical_frac", "config", "machine", "total_s"):
        assert key in res
    assert res["speedup_bs1"] > 0 and res["accept_len_bs1"] >= 1
    # 2 batch sizes x 2 modes x (no spec + 2 configs)
    assert len(res["table"]) == 12
    assert {(r["mode"], r["batch_size"], r["config"]) for r in res["table"]} == {
        (m, b, c) for m in ("greedy", "T=1") for b in (1, 2) for c in ("no spec", "chain s2", "tree s2 k2 n4")}
    for r in res["table"]:
        assert r["tokens"] == r["num_prompts"] * 6 and r["tok_s"] > 0
        assert (r["accept_len"] is None) == (r["config"] == "no spec")
    # float32: speculation is lossless, and every config sees the same prompts and seeds.
    assert set(res["greedy_identical_frac"].values()) == {1.0}
    assert set(res["sampled_identical_frac"].values()) == {1.0}
    assert os.path.getsize(tmp_path / "spec.png") > 1000
