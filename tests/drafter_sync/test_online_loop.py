"""The online loop as a user runs it (`OnlineDrafter`): rollouts fill the buffer through the engine's sink,
idle-time training publishes versions the engines serve losslessly, preemption within one step, and data of
a superseded policy aged out."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import tlt
from tlt.drafter_sync import OnlineDrafter
from tlt.drafter_sync.training import draft_vocab
from tlt.engine.spec.drafter import EagleDrafter

PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 200, 300], [1000, 7, 1000, 7], [42]]
GREEDY = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}


@pytest.fixture(scope="module")
def target_dir(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def base(target_dir):
    e = tlt.Engine(target_dir, dtype="float32", random_seed=0)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def reference(base):
    """The non-speculative engine's greedy outputs: what every speculative engine must reproduce."""
    return [o["output_ids"] for o in base.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.fixture(scope="module")
def drafter_dir(base, reference, tmp_path_factory):
    """An untrained drafter whose draft vocabulary covers the target's outputs (training can then help)."""
    mc = base.model_config
    d = EagleDrafter.random(mc, seed=1, draft_vocab_size=256)
    with torch.no_grad():
        d.d2t.copy_(draft_vocab(reference + PROMPTS, 256, mc.vocab_size))
    path = str(tmp_path_factory.mktemp("drafter"))
    d.save(path)
    return path


def spec_engine(target_dir, drafter_dir):
    return tlt.Engine(target_dir, dtype="float32", random_seed=0, speculative_draft_model_path=drafter_dir,
                      speculative_num_steps=3, speculative_eagle_topk=1)


def accept_length(outs) -> float:
    ver = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    return 1 + sum(o["meta_info"]["spec_accept_token_num"] for o in outs) / ver


def test_rollouts_fill_the_buffer_through_the_sink(target_dir, drafter_dir, base):
    e = spec_engine(target_dir, drafter_dir)
    od = OnlineDrafter([e, base], capacity_bytes=1 << 24)  # a plain engine feeds data too
    outs = e.generate(input_ids=PROMPTS, sampling_params={**GREEDY, "n": 2})
    base.generate(input_ids=PROMPTS[:1], sampling_params=GREEDY)
    assert len(od.buffer) == 2 * len(PROMPTS) + 1 and od.stats()["buffer"]["versions"] == ["default"]
    records = od.buffer.sample(200, torch.Generator().manual_seed(0))
    # every token but the last (never processed by the target); greedy: the n=2 samples are equal
    sequences = {tuple(p + o["output_ids"][:-1]) for p, o in zip([p for p in PROMPTS for _ in range(2)], outs)}
    assert {tuple(r["tokens"].tolist()) for r in records} == sequences
    H = e.model_config.hidden_size
    assert all(r["aux"].shape == (len(r["tokens"]), 3 * H) and r["hidden"].shape == (len(r["tokens"]), H)
               for r in records)
    assert od.sink_time_s > 0
    # only the speculative engine receives drafters; starting from None copies its drafter
    assert od.publisher.engines == [e] and od.drafter.d2t.tolist() == e.spec.drafter.d2t.tolist()
    od.close()
    e.generate(input_ids=PROMPTS[:1], sampling_params=GREEDY)
    assert len(od.buffer) == 2 * len(PROMPTS) + 1
    with pytest.raises(ValueError, match="no drafter"):
        OnlineDrafter(base)
    e.shutdown()


def test_idle_training_publishes_a_version_served_losslessly(target_dir, drafter_dir, reference):
    e = spec_engine(target_dir, drafter_dir)
    od = OnlineDrafter(e, drafter_dir, batch_size=4, window=40, lr=3e-3, warmup_steps=2)
    before = e.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in before] == reference
    first = e.get_model_info()["drafter_version"]

    res = od.train_idle(max_steps=60)
    assert (res["steps"], res["bad_steps"], res["stopped"]) == (60, 0, "max_steps")
    assert res["published"] == "online-1" and res["preemption_latency_s"] is None
    assert e.get_model_info()["drafter_version"] == "online-1" != first

    after = e.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in after] == reference  # lossless with the new drafter
    assert {o["meta_info"]["drafter_version"] for o in after} == {"online-1"}
    # trained on exactly these rollouts, the new drafter is accepted far more often than the random one
    assert accept_length(after) > accept_length(before) + 0.5, (accept_length(before), accept_length(after))
    assert od.train_idle(max_steps=0)["published"] is None and od.publish() is None  # nothing new
    e.shutdown()


def test_should_yield_stops_within_one_step(target_dir, drafter_dir):
    e = spec_engine(target_dir, drafter_dir)
    od = OnlineDrafter(e, batch_size=4, window=32)
    e.generate(input_ids=PROMPTS, sampling_params={**GREEDY, "n": 2})
    work_arrived = threading.Event()
    spans: list[tuple[float, float]] = []
    step = od.spot.train_step

    def long_third_step(items=None):
        t0 = time.perf_counter()
        if len(spans) == 2:  # rollout work arrives while the third step runs, a long one
            work_arrived.set()
            time.sleep(0.2)
        out = step(items)
        spans.append((t0, time.perf_counter()))
        return out

    od.spot.train_step = long_third_step
    res = od.train_idle(work_arrived.is_set, publish=False)
    returned = time.perf_counter()
    assert (res["stopped"], res["steps"]) == ("yield", 3)  # the step in flight ends, no other starts
    in_flight = spans[2][1] - spans[2][0]
    # timed from the flag turning True (mid-step), not from the check after the step: at least the sleep
    assert 0.15 <= res["preemption_latency_s"] <= min(in_flight + 0.05, returned - spans[2][0])
    res = od.train_idle(lambda: True)
    assert res["steps"] == 0 and res["published"] is None and res["preemption_latency_s"] < 0.05
    e.shutdown()


def test_policy_update_ages_data_out(target_dir, drafter_dir):
    e = spec_engine(target_dir, drafter_dir)
    od = OnlineDrafter(e)
    e.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert len(od.buffer) == len(PROMPTS)
    emb = e.get_weights_by_name("model.embed_tokens.weight")
    e.update_weights_from_tensor([("model.embed_tokens.weight", emb * 1.5)], weight_version="1")
    info = od.on_policy_update("1")
    assert info == {"weight_version": "1", "aged_out": len(PROMPTS), "records": 0}
    assert torch.equal(od.embed.weight, emb * 1.5)  # the drafter's input embedding follows the policy
    assert od.train_idle()["stopped"] == "no_data"

    e.generate(input_ids=PROMPTS[:2], sampling_params=GREEDY)
    assert od.stats()["buffer"]["versions"] == ["1"] and len(od.buffer) == 2
    assert not od.buffer.push(dict(od.buffer.sample(1, torch.Generator())[0], weight_version="default"))

    two = OnlineDrafter(e, keep_versions=2)  # keeps the previous policy's data one update longer
    e.generate(input_ids=PROMPTS[:1], sampling_params=GREEDY)
    e.update_weights_from_tensor([("model.embed_tokens.weight", emb)], weight_version="2")
    assert two.on_policy_update()["aged_out"] == 0  # default: the engine's weight version
    e.generate(input_ids=PROMPTS[:1], sampling_params=GREEDY)
    assert two.on_policy_update("3")["aged_out"] == 1 and two.stats()["buffer"]["versions"] == ["2", "3"]
    e.shutdown()


def test_publish_gate_keeps_a_worse_drafter_out(target_dir, drafter_dir, reference):
    """With `holdout_every`, a version is published only if it does at least as well as the serving one on
    held-out records: a trained drafter passes, a ruined one is refused and the engine keeps the old one."""
    e = spec_engine(target_dir, drafter_dir)
    od = OnlineDrafter(e, drafter_dir, batch_size=4, window=40, lr=3e-3, warmup_steps=2, holdout_every=3)
    # Greedy n=4: four equal samples per prompt, so held-out records repeat training ones (a tiny random
    # target's outputs do not generalise across prompts; held-out prompts would score 0 for every drafter).
    e.generate(input_ids=PROMPTS, sampling_params={**GREEDY, "n": 4})
    assert len(od.holdout) == 5 and len(od.buffer) == 11  # every 3rd of the 16 records held out
    held = {tuple(r["tokens"].tolist()) for r in od.holdout.sample(50, torch.Generator().manual_seed(0))}
    trained = {tuple(r["tokens"].tolist()) for r in od.buffer.sample(200, torch.Generator().manual_seed(0))}
    assert held <= trained

    res = od.train_idle(max_steps=60)
    gate = od.last_gate
    assert res["published"] == "online-1" and gate["candidate"] >= gate["serving"] + 0.5, gate
    with torch.no_grad():  # ruin the drafter being trained
        for p in od.drafter.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 3)
    assert od.spot.train_step() is not None
    assert od.publish() is None and od.gate_rejections == 1
    assert od.last_gate["candidate"] < od.last_gate["serving"]
    assert e.get_model_info()["drafter_version"] == "online-1"  # the good version keeps serving
    out = e.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in out] == reference
    assert od.stats()["gate_rejections"] == 1
    e.shutdown()
