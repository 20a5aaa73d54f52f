"""The GRPO trainer on tiny random models: the math, weight pushes (good and rejected), reproducibility,
losslessness with speculation, and the HTTP path."""

from __future__ import annotations

import math

import pytest
import torch

import tlt
from tlt.engine.models.decoder import batch_invariant_supported
from tlt.engine.models.weights import WeightUpdateError
from tlt.rl_bridge import grpo

ENGINE = dict(dtype="float32", random_seed=0, kv_cache_bytes=64 << 20)
# A tiny random model never solves arithmetic: reward something it does half the time, so groups vary.
CFG = dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=8, lr=1e-3, micro_batch=4)


def parity_reward(out: dict, problem) -> float:
    return float(out["output_ids"][0] % 2 == 0)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread: tiny models are overhead-bound, and a shared 2-core machine stalls two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def engine(tiny_llama):
    e = tlt.Engine(tiny_llama, **ENGINE)
    yield e
    e.shutdown()


def _trainer(engine, **cfg) -> grpo.GRPOTrainer:
    policy = grpo.build_policy(engine.model_config, engine.get_weights_by_name)
    return grpo.GRPOTrainer(grpo.EngineRollouts(engine), policy, engine.tokenizer,
                            grpo.GRPOConfig(**{**CFG, **cfg}), log=lambda m: None, reward_fn=parity_reward)


def _all_weights(engine, names) -> dict[str, torch.Tensor]:
    return {n: engine.get_weights_by_name(n) for n in names}


# ---------------------------------------------------------------------------------------------- math
def test_sampling_seed_is_a_pure_function():
    assert grpo.sampling_seed(0, 1, 2) == grpo.sampling_seed(0, 1, 2)
    seeds = {grpo.sampling_seed(s, k, i) for s in range(3) for k in range(1, 5) for i in range(8)}
    assert len(seeds) == 3 * 4 * 8
    assert all(0 <= x < 2**31 for x in seeds)


def test_advantages_are_normalised_per_group():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 0, 3, 1, 2, 2])
    adv = grpo.group_advantages(r, 4).view(4, 4)
    assert torch.equal(adv[1], torch.zeros(4))  # all equal: no signal
    for g in (0, 2, 3):
        assert abs(float(adv[g].mean())) < 1e-6
        assert float(adv[g].std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    # Group 0 by hand: mean 0.5, population std 0.5, eps 1e-4.
    assert adv[0].tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001])
    # Ranking within a group is kept, and groups do not mix: shifting one group's rewards changes nothing.
    r2 = r.clone()
    r2[12:] += 10
    assert torch.allclose(grpo.group_advantages(r2, 4), grpo.group_advantages(r, 4))


def test_loss_gradient_matches_hand_computation():
    eps = 0.2
    old = torch.zeros(2, 3)
    # Sequence 0 (A = +1.5): ratios e^0.1 (inside), e^0.3 (above 1 + eps: clipped), e^-0.5 (below 1 - eps,
    # but A > 0 takes the unclipped, smaller term). Sequence 1 (A = -0.5): e^-0.3 (below 1 - eps: clipped),
    # e^0.1 (inside), and a padding position.
    delta = torch.tensor([[0.1, 0.3, -0.5], [-0.3, 0.1, 0.7]])
    new = (old + delta).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.5, -0.5])
    loss, stats = grpo.clipped_pg_loss(new, old, adv, mask, eps, denominator=4)
    loss.backward()

    r = delta.exp()
    seq0 = [r[0, 0] * 1.5, (1 + eps) * 1.5, r[0, 2] * 1.5]
    seq1 = [(1 - eps) * -0.5, r[1, 1] * -0.5]
    want_loss = (-sum(seq0) / 3 - sum(seq1) / 2) / 4
    assert float(loss.detach()) == pytest.approx(float(want_loss), rel=1e-6)
    # d loss / d new_lp = -A * ratio / (len * denominator) on unclipped tokens, 0 on clipped and padding.
    want = torch.tensor([[-1.5 * r[0, 0] / 12, 0.0, -1.5 * r[0, 2] / 12],
                         [0.0, 0.5 * r[1, 1] / 8, 0.0]])
    assert torch.allclose(new.grad, want, atol=1e-7)
    assert stats["clip_tokens"] == 3 and stats["tokens"] == 5  # e^0.3, e^-0.5, e^-0.3 are outside [0.8, 1.2]


def test_tail_seconds():
    tl = [(0.0, 0, 3, None), (1.0, 12, 0, None), (3.0, 8, 0, None), (4.0, 2, 0, None), (4.5, 0, 0, None)]
    assert grpo.tail_seconds(tl, 5.0) == pytest.approx(1.5)  # [3, 4.5): 8 then 2 running, none waiting
    assert grpo.tail_seconds([(0.0, 4, 1, None), (1.0, 4, 0, None)], 2.0) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "qwen3"])
def test_policy_logprobs_match_the_engine(tiny_models, family):
    """The transformers policy, filled from the engine by HF names, gives the engine's rollout log-probs."""
    e = tlt.Engine(tiny_models[family], **ENGINE)
    try:
        policy = grpo.build_policy(e.model_config, e.get_weights_by_name)
        prompts = [[1, 5, 7, 9, 11], [3, 4]]
        outs = e.generate(input_ids=prompts, sampling_params={"temperature": 0.7, "max_new_tokens": 8, "n": 2,
                                                              "sampling_seed": 3}, return_logprob=True)
        lp, mask = grpo.completion_logprobs(policy, [prompts[i // 2] for i in range(4)],
                                            [o["output_ids"] for o in outs], 0.7)
        # Samples of one prompt (the prompt's KV computed once and shared) and of two prompts (one forward).
        shared, shared_mask = grpo.completion_logprobs(policy, [prompts[0]] * 2, [o["output_ids"] for o in outs[:2]],
                                                       0.7)
        for b, o in enumerate(outs):
            ref = torch.tensor([x[0] for x in o["meta_info"]["output_token_logprobs"]])
            assert int(mask[b].sum()) == len(ref)
            assert torch.allclose(lp[b, : len(ref)], ref, atol=1e-4)
            if b < 2:
                assert int(shared_mask[b].sum()) == len(ref)
                assert torch.allclose(shared[b, : len(ref)], ref, atol=1e-4)
    finally:
        e.shutdown()


def test_shared_prompt_gradient_equals_full_forward(engine):
    """The group path (prompt once, KV shared) gives the gradient of one forward over whole sequences."""
    policy = grpo.build_policy(engine.model_config, engine.get_weights_by_name)
    prompt = [1, 5, 7, 9, 11]
    comps = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    grads = []
    for path in ("shared", "full"):
        policy.zero_grad()
        if path == "shared":
            lp, mask = grpo.completion_logprobs(policy, [prompt] * 3, comps, 0.7)
        else:  # one sequence per call: the plain forward
            rows = [grpo.completion_logprobs(policy, [prompt], [c], 0.7) for c in comps]
            lp = torch.zeros(3, 4)
            mask = torch.zeros(3, 4, dtype=torch.bool)
            for b, (x, m) in enumerate(rows):
                lp[b, : x.shape[1]], mask[b, : m.shape[1]] = x[0], m[0]
        (lp * mask * torch.arange(1, 13, dtype=torch.float32).view(3, 4)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


# ---------------------------------------------------------------------------------------------- weights
def test_step_pushes_new_weights_to_the_engine(engine):
    tr = _trainer(engine)
    names = [n for n, _ in tr.policy.named_parameters()]
    before = _all_weights(engine, names)
    probe = {"temperature": 0, "max_new_tokens": 6}
    out0 = engine.generate(input_ids=[5, 6, 7], sampling_params=probe, return_logprob=True)
    assert engine.weight_version == "default"

    rec = tr.step(1)
    assert rec.trained_seqs > 0 and rec.weight_version == "default"  # drawn by the old weights
    assert engine.weight_version == "1"
    after = _all_weights(engine, names)
    policy = dict(tr.policy.named_parameters())
    assert all(torch.equal(after[n], policy[n].detach()) for n in names)  # the engine holds the policy
    assert any(not torch.equal(after[n], before[n]) for n in names)
    out1 = engine.generate(input_ids=[5, 6, 7], sampling_params=probe, return_logprob=True)
    assert out1["meta_info"]["output_token_logprobs"] != out0["meta_info"]["output_token_logprobs"]
    assert tr.step(2).weight_version == "1" and engine.weight_version == "2"


def test_rejected_push_leaves_the_engine_whole(engine):
    tr = _trainer(engine)
    names = [n for n, _ in tr.policy.named_parameters()]
    tr.step(1)
    before = _all_weights(engine, names)
    probe = {"temperature": 0, "max_new_tokens": 6}
    out0 = engine.generate(input_ids=[5, 6, 7], sampling_params=probe, return_logprob=True)
    with torch.no_grad():
        tr.policy.get_decoder().norm.weight[0] = float("nan")  # a poisoned policy
    with pytest.raises(WeightUpdateError, match="NaN"):
        tr.step(2)
    assert engine.weight_version == "1"
    after = _all_weights(engine, names)
    assert all(torch.equal(after[n], before[n]) for n in names)
    again = engine.generate(input_ids=[5, 6, 7], sampling_params=probe, return_logprob=True)
    assert again["output_ids"] == out0["output_ids"]
    assert again["meta_info"]["output_token_logprobs"] == out0["meta_info"]["output_token_logprobs"]


# ---------------------------------------------------------------------------------------------- runs
def _run(path: str, steps: int = 2, **engine_kw) -> list[grpo.StepRecord]:
    e = tlt.Engine(path, **{**ENGINE, **engine_kw})
    try:
        return _trainer(e, steps=steps).run()
    finally:
        e.shutdown()


def _run_cfg(path: str, engine_kw: dict, **cfg) -> list[grpo.StepRecord]:
    e = tlt.Engine(path, **{**ENGINE, **engine_kw})
    try:
        return _trainer(e, **cfg).run()
    finally:
        e.shutdown()


def test_same_seed_same_rollouts_and_rewards(tiny_llama):
    a, b = _run(tiny_llama), _run(tiny_llama)
    cmp = grpo.compare_rollouts(a, b, CFG["group_size"])
    assert all(c["identical"] and c["same_rewards"] and c["max_logprob_diff"] == 0.0 for c in cmp)
    assert [r.loss for r in a] == [r.loss for r in b]
    assert sum(r.trained_seqs for r in a) > 0


def test_speculation_is_lossless_in_training(tiny_llama, tmp_path):
    """Baseline vs speculation (random drafter, adaptive selector): the same rollouts at the same weights."""
    from tlt.engine.spec.drafter import EagleDrafter

    e = tlt.Engine(tiny_llama, **ENGINE)
    EagleDrafter.random(e.model_config, seed=0, draft_vocab_size=4096).save(str(tmp_path / "d"))
    e.shutdown()
    base = _run(tiny_llama, steps=3)
    spec = _run(tiny_llama, steps=3, speculative_draft_model_path=str(tmp_path / "d"), speculative_adaptive=True)
    assert sum(sum(r.arm_stats.get("spec_rounds_by_arm", {}).values()) for r in spec) > 0
    cmp = grpo.compare_rollouts(base, spec, CFG["group_size"])
    assert cmp[0]["identical"] and cmp[0]["same_rewards"] and cmp[0]["max_logprob_diff"] < 1e-4
    for c in cmp:  # a later difference may only follow from an earlier one, never at identical weights
        assert c["identical"] or not c["first_difference"]["reason"].startswith("not lossless"), c


@pytest.mark.skipif(not batch_invariant_supported(torch.bfloat16, torch.device("cpu"), 64),
                    reason="batch-invariant bf16 kernels need AVX512-BF16 and the C kernels")
def test_bf16_deterministic_speculation_is_bit_identical_in_training(tmp_path, smol_tokenizer_dir):
    """bf16 engines with enable_deterministic_inference: baseline and speculation give the same rollouts and the
    very same log-prob bits, so the two trainings stay identical step after step (float32 engines only promise
    the tokens: their log-probs differ in the last bits)."""
    from tiny_models import make_tiny_checkpoint

    from tlt.engine.spec.drafter import EagleDrafter

    path = make_tiny_checkpoint(tmp_path / "m", "llama", smol_tokenizer_dir, seed=4, hidden_size=256,
                                intermediate_size=512, num_attention_heads=4, head_dim=64)
    kw = dict(dtype="bfloat16", enable_deterministic_inference=True)
    e = tlt.Engine(path, **{**ENGINE, **kw})
    EagleDrafter.random(e.model_config, seed=0, draft_vocab_size=4096).save(str(tmp_path / "d"))
    e.shutdown()
    # 32 sequences under a static chain of 3: verify passes of 128 rows, decode passes of 32 (and fewer as
    # sequences end), where bf16 kernels chosen by row count would round differently
    base = _run_cfg(path, kw, steps=3, prompts_per_step=4, group_size=8)
    spec = _run_cfg(path, dict(kw, speculative_draft_model_path=str(tmp_path / "d"), speculative_num_steps=3),
                    steps=3, prompts_per_step=4, group_size=8)
    assert sum(r.arm_stats.get("spec_verify_rounds", 0) for r in spec) > 0, spec[0].arm_stats
    cmp = grpo.compare_rollouts(base, spec, 8, dtype="bfloat16", deterministic=True)
    assert all(c["identical"] and c["same_rewards"] and c["max_logprob_diff"] == 0.0 for c in cmp), cmp
    assert [r.loss for r in base] == [r.loss for r in spec]


def test_earned_drafter_budget_spends_only_what_speculation_saved():
    fixed = grpo.DrafterBudget("fixed", 2.0)
    assert fixed.allowance(-5.0) == 2.0 and fixed.allowance(0.0) == 2.0  # savings do not matter
    b = grpo.DrafterBudget("earned", 2.0, min_s=1.0)
    assert b.allowance(0.4) == 0.0  # 0.4 banked: below the minimum worth a run
    assert b.allowance(0.8) == pytest.approx(1.2)
    b.spend(1.3)  # a step overran its allowance: the debt carries over
    assert b.banked_s == pytest.approx(-0.1)
    assert b.allowance(-3.0) == 0.0  # speculation lost time: paid back before any training
    assert b.allowance(10.0) == 2.0  # at most max_s, and no more than that is banked
    b.spend(2.0)
    assert b.allowance(0.0) == 0.0
    with pytest.raises(ValueError, match="budget"):
        grpo.DrafterBudget("idle", 1.0)


def test_engine_counts_time_speculation_saved(tiny_llama, tmp_path):
    """spec_seconds_saved: speculative rounds against plain rounds timed at the same batch bucket."""
    from tlt.engine.spec.drafter import EagleDrafter

    e = tlt.Engine(tiny_llama, **ENGINE)
    EagleDrafter.random(e.model_config, seed=0, draft_vocab_size=4096).save(str(tmp_path / "d"))
    e.shutdown()
    e = tlt.Engine(tiny_llama, **ENGINE, speculative_draft_model_path=str(tmp_path / "d"), speculative_adaptive=True)
    sp = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    e.generate(input_ids=[[5, 6, 7]], sampling_params=sp)
    st = e.get_stats()
    log = e.get_round_log()
    e.shutdown()
    spec_rounds = [r for r in log if r["arm"] != "off"]
    assert spec_rounds and any(r["arm"] == "off" for r in log)
    # A random drafter emits ~1 token per round (acceptance ~0) at the cost of a plain round plus drafting:
    # speculation lost time, and at most what its rounds took.
    assert -sum(r["seconds"] for r in spec_rounds) <= st["spec_seconds_saved"] < 0


def test_run_stops_at_the_time_budget(engine):
    tr = _trainer(engine, steps=5)
    recs = tr.run(time_budget_s=1e-9)
    assert len(recs) == 1  # the first step always runs; the second would overrun


# ---------------------------------------------------------------------------------------------- HTTP
def test_http_backend_matches_in_process(tiny_llama, tmp_path):
    """One step through `tlt serve`: the same rollouts as in process, and the server gets the weights."""
    from server_proc import launch

    server = launch(tiny_llama, tmp_path)
    try:
        backend = grpo.HttpRollouts(server.url)
        policy, _ = grpo.policy_from_checkpoint(tiny_llama)
        e = tlt.Engine(tiny_llama, **ENGINE)
        tokenizer = e.tokenizer
        tr = grpo.GRPOTrainer(backend, policy, tokenizer, grpo.GRPOConfig(**{**CFG, "steps": 1}),
                              log=lambda m: None, reward_fn=parity_reward)
        rec = tr.step(1)
        assert backend.client.get_weight_version() == "1"
        name = "model.layers.0.mlp.down_proj.weight"
        served = torch.tensor(backend.client.get_weights_by_name(name, truncate_size=4))  # the first 4 rows
        assert torch.equal(served, dict(policy.named_parameters())[name].detach()[:4])
        ref = _trainer(e, steps=1).step(1)
        e.shutdown()
        assert rec.output_ids == ref.output_ids and rec.rewards == ref.rewards
        assert all(math.isclose(u, v, abs_tol=1e-5) for x, y in zip(rec.output_logprobs, ref.output_logprobs)
                   for u, v in zip(x, y))
        backend.close()
    finally:
        server.stop()
