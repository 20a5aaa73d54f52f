"""Adaptive speculation stays lossless while the arm changes every round; drafter hot-swap; the acceptance
watch after a policy update; the drafter-data sink hands out exactly the target's states."""

from __future__ import annotations

import asyncio

import pytest
import torch

import tlt
from tlt.drafter_sync.training import target_features
from tlt.engine.spec.drafter import EagleDrafter

PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 200, 300], [1000] * 20, [7]]
ARMS = ["s1k1n2", "s3k1n4", "s4k2n8"]


@pytest.fixture(scope="module")
def target_dir(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def base_engine(target_dir):
    e = tlt.Engine(target_dir, dtype="float32", random_seed=0)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def drafters(base_engine, tmp_path_factory):
    out = []
    for seed in (1, 2):
        d = str(tmp_path_factory.mktemp(f"drafter{seed}"))
        EagleDrafter.random(base_engine.model_config, seed=seed, draft_vocab_size=4096).save(d)
        out.append(d)
    return out


def adaptive_engine(target_dir, drafter_dir, **kw):
    kw = {"speculative_arms": ARMS, "speculative_epsilon": 0.5, **kw}
    return tlt.Engine(target_dir, dtype="float32", random_seed=0, speculative_draft_model_path=drafter_dir,
                      speculative_adaptive=True, **kw)


@pytest.mark.parametrize("sp", [{"temperature": 0}, {"temperature": 1.0, "sampling_seed": 3, "n": 2}],
                         ids=["greedy", "seeded-n2"])
@pytest.mark.parametrize("policy", ["epsilon_greedy", "ucb"])
def test_switching_arms_is_token_identical(base_engine, target_dir, drafters, sp, policy):
    sp = dict(sp, max_new_tokens=40, ignore_eos=True)
    ref = base_engine.generate(input_ids=PROMPTS, sampling_params=sp)
    e = adaptive_engine(target_dir, drafters[0], speculative_selector=policy)
    e.selector.cfg.explore_floor = 0.0  # a random drafter's arms are hopeless: explore them anyway
    out = e.generate(input_ids=PROMPTS, sampling_params=sp)
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
    used = {r["arm"] for r in e.get_round_log()}
    assert "off" in used and len(used) >= 3, used  # plain and speculative rounds interleaved
    stats = e.get_stats()
    assert sum(stats["spec_tokens_by_arm"].values()) == stats["generated_tokens"] - len(out)  # minus prefill's
    assert stats["speculation"]["estimates"]
    e.shutdown()


def test_set_speculation(target_dir, drafters):
    e = adaptive_engine(target_dir, drafters[0])
    sp = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    e.set_speculation("off")
    e.generate(input_ids=PROMPTS, sampling_params=sp)
    assert {r["arm"] for r in e.get_round_log(clear=True)} == {"off"}
    e.set_speculation("s3k1n4")
    e.generate(input_ids=PROMPTS, sampling_params=sp)
    assert {r["arm"] for r in e.get_round_log(clear=True)} == {"s3k1n4"}
    with pytest.raises(ValueError, match="margin"):
        e.set_speculation("s9k4n40")
    with pytest.raises(ValueError):
        e.set_speculation("bogus")
    e.set_speculation("adaptive")
    e.generate(input_ids=PROMPTS, sampling_params=sp)
    assert e.get_stats()["speculation"]["estimates"]["yield"]  # the bandit learned something
    cfg = e.selector.cfg
    e.reset_selector()
    assert e.get_stats()["speculation"]["estimates"] == {"yield": {}} and e.selector.cfg is cfg
    e.shutdown()
    plain = tlt.Engine(target_dir, dtype="float32", speculative_draft_model_path=drafters[0])
    with pytest.raises(ValueError, match="speculative_adaptive"):
        plain.set_speculation("adaptive")
    plain.shutdown()


def test_drafter_swap_mid_generation_is_lossless(base_engine, target_dir, drafters):
    sp = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
    ref = base_engine.generate(input_ids=PROMPTS, sampling_params=sp)
    e = adaptive_engine(target_dir, drafters[0])
    new = EagleDrafter.load(drafters[1], e.model_config)

    async def run():
        task = asyncio.ensure_future(e.async_generate(input_ids=PROMPTS, sampling_params=sp))
        while e.stats["num_decode_steps"] < 6:
            await asyncio.sleep(0)
        e.update_drafter(new, version="v2")
        return await task

    out = asyncio.run(run())
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
    assert all(o["meta_info"]["drafter_version"] == "v2" for o in out)
    assert e.get_stats()["drafter_swaps"] == 1 and e.get_model_info()["drafter_version"] == "v2"
    bad = EagleDrafter.load(drafters[1], e.model_config)
    with torch.no_grad():
        bad.fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        e.update_drafter(bad, version="v3")
    assert e.drafter_version == "v2"
    e.shutdown()


def _constant_setup(target_dir, drafter_dir, tmp_path):
    """A target whose final norm is zero (all logits 0: greedy always emits token 0) and a drafter that
    always proposes token 0: every draft token is accepted, until the policy changes."""
    e = tlt.Engine(target_dir, dtype="float32", random_seed=0, speculative_draft_model_path=drafter_dir,
                   speculative_num_steps=3, speculative_eagle_topk=1)
    norm = e.get_weights_by_name("model.norm.weight")
    e.update_weights_from_tensor([("model.norm.weight", torch.zeros_like(norm))], weight_version="zero")
    good = EagleDrafter.load(drafter_dir, e.model_config)
    with torch.no_grad():
        good.d2t.zero_()  # every draft id maps to target token 0
    e.update_drafter(good, version="always-zero")
    return e, norm


def test_drafter_swap_takes_effect(target_dir, drafters, tmp_path):
    e, _ = _constant_setup(target_dir, drafters[0], tmp_path)
    out = e.generate(input_ids=PROMPTS[0], sampling_params={"temperature": 0, "max_new_tokens": 33,
                                                             "ignore_eos": True})
    assert set(out["output_ids"]) == {0}
    assert out["meta_info"]["spec_accept_token_num"] == 3 * out["meta_info"]["spec_verify_ct"]
    e.shutdown()


def test_acceptance_collapse_suspends_speculation(target_dir, drafters, tmp_path):
    e, norm = _constant_setup(target_dir, drafters[0], tmp_path)
    sp = {"temperature": 0, "max_new_tokens": 60, "ignore_eos": True}
    e.generate(input_ids=PROMPTS[0], sampling_params=sp)  # full acceptance: the watch's baseline
    e.update_weights_from_tensor([("model.norm.weight", norm)], weight_version="v1")  # the policy moves
    e.get_round_log(clear=True)
    e.generate(input_ids=PROMPTS[0], sampling_params=sp)
    assert e.get_stats()["spec_fallbacks"] == 1 and e.spec_suspended is not None
    arms = [r["arm"] for r in e.get_round_log(clear=True)]
    assert arms[:8] == ["s3k1n4"] * 8 and set(arms[8:]) == {"off"}, arms  # 8 rounds to notice, then off
    e.update_drafter(drafters[1], version="fresh")  # a new drafter: speculation resumes
    assert e.spec_suspended is None
    e.generate(input_ids=PROMPTS[0], sampling_params={**sp, "max_new_tokens": 8})
    assert {r["arm"] for r in e.get_round_log()} == {"s3k1n4"}
    e.shutdown()


@pytest.mark.parametrize("spec", [False, True], ids=["plain", "tree"])
def test_drafter_data_equals_a_full_forward(target_dir, drafters, spec):
    kw = {"speculative_draft_model_path": drafters[0], "speculative_num_steps": 3,
          "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 5} if spec else {}
    e = tlt.Engine(target_dir, dtype="float32", random_seed=0, **kw)
    records = []
    e.set_drafter_data_sink(records.append)
    e.generate(input_ids=PROMPTS, sampling_params={"temperature": 1.0, "sampling_seed": 1, "max_new_tokens": 20,
                                                   "ignore_eos": True, "n": 2})
    assert len(records) == 2 * len(PROMPTS) and e.get_stats()["drafter_records"] == len(records)
    V = e.model_config.vocab_size
    ref = target_features(e, [r["tokens"].tolist() for r in records], torch.arange(V))
    for r, x in zip(records, ref):
        assert r["aux"].shape == x["aux"].shape and r["prompt_len"] in (len(p) for p in PROMPTS)
        assert torch.allclose(r["aux"].float(), x["aux"], atol=1e-4)
        lp = torch.log_softmax(e.model.logits(r["hidden"]).float(), dim=-1)
        assert torch.allclose(lp, x["target_logp"].float(), rtol=8e-3, atol=1e-3)  # stored in bf16
    e.set_drafter_data_sink(lambda r: 1 / 0)  # a failing sink never breaks a rollout
    out = e.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 4})
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert e.get_stats()["drafter_sink_errors"] == 1
    e.shutdown()


def test_packed_bf16_drafter_matches_plain(base_engine):
    """The engine serves its drafter with oneDNN pre-packed weights (CPU, bf16): same outputs as unpacked."""
    from tlt.engine.models.decoder import Linear, cpu_packing_supported

    if not cpu_packing_supported(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no oneDNN bf16 packing on this CPU")
    d = EagleDrafter.random(base_engine.model_config, seed=3, draft_vocab_size=512).to(torch.bfloat16)
    d.eval().requires_grad_(False)
    h = torch.randn(4, 7, d.cfg.hidden_size, dtype=torch.bfloat16)
    aux = torch.randn(4, 7, 3 * d.cfg.hidden_size, dtype=torch.bfloat16)
    plain = (d.fc(aux), d.layer_input(h, h), d.head(h))
    d.pack_weights()
    assert all(m.packed is not None for m in d.modules() if isinstance(m, Linear))
    packed = (d.fc(aux), d.layer_input(h, h), d.head(h))
    for a, b in zip(plain, packed):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    trainable = EagleDrafter.random(base_engine.model_config, seed=3, draft_vocab_size=512).to(torch.bfloat16)
    trainable.pack_weights()  # a drafter being trained is never packed: its parameters change every step
    assert all(m.packed is None for m in trainable.modules() if isinstance(m, Linear))
