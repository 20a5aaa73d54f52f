"""Smoke test of benchmarks/rl_grpo.py (tlt bench rl, tlt demo) on a tiny random model with a random drafter."""

from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # benchmarks/ is not installed; `python -m pytest` from the root has it already
    sys.path.insert(0, ROOT)

ARGS = ["--steps", "2", "--prompts", "2", "--n", "4", "--max-new-tokens", "8", "--threads", "1",
        "--drafter-train-s", "0.2", "--lr", "1e-3"]


def test_bench_rl_writes_json_and_plots(tiny_models, tmp_path):
    from benchmarks import rl_grpo

    out = tmp_path / "rl.json"
    threads = torch.get_num_threads()
    try:
        rl_grpo.main(["--json", str(out), "--model-path", tiny_models["llama"], *ARGS])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    for key in ("e2e_speedup", "rollout_speedup", "rewards_baseline", "rewards_tlt", "rollouts_identical",
                "replay_identical", "seconds", "per_step", "comparison", "timelines", "config", "machine"):
        assert key in res
    assert res["steps"] == 2 and len(res["rewards_baseline"]) == len(res["rewards_tlt"]) == 2
    assert res["e2e_speedup"] > 0 and res["rollout_speedup"] > 0
    same_train = res["e2e_speedup_same_train"]  # training times evened out: only when the rollouts were identical
    assert (same_train > 0) if res["rollouts_identical"] else same_train is None
    assert res["config"]["drafter"] == "random"
    for mode in ("baseline", "tlt"):
        assert set(res["seconds"][mode]) == {"step", "rollout", "tail", "train", "push", "drafter"}
    base, tlt = res["per_step"]["baseline"], res["per_step"]["tlt"]
    assert all(r["accept_len"] is None and not r["arm_stats"]["spec_rounds_by_arm"] for r in base)
    assert res["config"]["tlt_speculation"] == {"speculative_adaptive": True}
    assert all(sum(r["arm_stats"]["spec_rounds_by_arm"].values()) > 0 for r in tlt)  # a speculative engine
    # The default budget is earned: a random drafter saves no time, so the online drafter does not train.
    assert res["config"]["drafter_budget"] == "earned"
    assert all(r["drafter_train"]["saved_s"] <= 0 and r["drafter_train"]["steps"] == 0 for r in tlt)
    # float32, same seeds: the first step's rollouts are identical, and the replays without speculation too.
    assert res["comparison"][0]["identical"] and res["replay_identical"] == [True, True]
    assert all(c["identical"] or not c["first_difference"]["reason"].startswith("not lossless")
               for c in res["comparison"])
    for p in res["plots"]:
        assert os.path.getsize(p) > 1000


def test_demo_writes_a_report_folder(tiny_models, tmp_path, capsys):
    from benchmarks import rl_grpo

    threads = torch.get_num_threads()
    try:
        rl_grpo.demo(["--out", str(tmp_path / "report"), "--model-path", tiny_models["llama"], *ARGS,
                      "--time-budget", "120"])
    finally:
        torch.set_num_threads(threads)
    files = sorted(os.listdir(tmp_path / "report"))
    assert files == ["accept_length.png", "report.json", "reward_per_step.png", "rollout_timeline.png"]
    assert "e2e speedup" in capsys.readouterr().out
