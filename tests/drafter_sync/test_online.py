"""Online drafter training: the rollout data buffer, spot training (preemption, bad steps) and publishing."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch

import tlt
from tlt.drafter_sync import OnlineDrafter
from tlt.drafter_sync.buffer import DrafterDataBuffer
from tlt.drafter_sync.publish import DrafterPublisher
from tlt.drafter_sync.trainer import SpotTrainer
from tlt.drafter_sync.training import DrafterTrainer, TrainerConfig, target_features
from tlt.engine.kv_cache import KVCache
from tlt.engine.models.rope import RotaryTable
from tlt.engine.runner import ModelRunner
from tlt.engine.spec.drafter import DrafterConfig, EagleDrafter

VD = 64  # draft vocabulary of the test drafters


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = tlt.Engine(tiny_models["llama"], dtype="float32")
    yield e
    e.shutdown()


def _record(m: int, H: int = 64, prompt_len: int = 3, version: str = "v0", mark: int = 0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (m,), generator=g)
    tokens[0] = mark  # identifies the record in assertions
    return {"tokens": tokens, "aux": torch.randn(m, 3 * H, generator=g), "hidden": torch.randn(m, H, generator=g),
            "prompt_len": prompt_len, "weight_version": version}


def _record_bytes(m: int, H: int = 64) -> int:
    return m * 8 + m * 3 * H * 4 + m * H * 4


def _decoded_records(engine, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """Records as the engine hands them out: hidden states captured by the prefill of the prompt and then by
    each greedy decode step (the final sampled token is never processed, so it is dropped)."""
    mc = engine.model_config
    aux_layers = DrafterConfig.for_target(mc).aux_layers
    out = []
    for prompt in prompts:
        longest = len(prompt) + new_tokens
        kv = KVCache(mc, engine.dtype, engine.device, capacity_bytes=(longest + 256) * engine.kv.bytes_per_token,
                     max_rows=1, max_len=longest + 128)
        runner = ModelRunner(engine.model, kv, engine.device)

        class _Row:
            kv_len = 0

        kv.add(_Row(), longest)
        hidden, captured = runner.prefill([prompt], 0, aux_layers)
        hs, auxs, tokens = [hidden[0]], [torch.cat(captured, -1)[0]], list(prompt)
        nxt = int(engine.model.logits(hidden[0, -1]).argmax())
        for _ in range(new_tokens - 1):
            h, cap = runner.decode([nxt], [len(tokens)], aux_layers)
            tokens.append(nxt)
            hs.append(h[0])
            auxs.append(torch.cat(cap, -1)[0])
            nxt = int(engine.model.logits(h[0, -1]).argmax())
        out.append({"tokens": torch.tensor(tokens), "aux": torch.cat(auxs), "hidden": torch.cat(hs),
                    "prompt_len": len(prompt), "weight_version": "v0"})
    return out


def _spot(engine, records, seed: int = 0, **kw) -> SpotTrainer:
    mc = engine.model_config
    buf = DrafterDataBuffer(1 << 24, hidden_size=mc.hidden_size)
    for r in records:
        buf.push(r)
    drafter = EagleDrafter.random(mc, seed=seed, draft_vocab_size=VD)
    embed = torch.nn.Embedding.from_pretrained(engine.model.embed.weight.detach().float())
    rope = RotaryTable(mc.head_dim, mc.rope_theta, mc.rope_scaling, 128, "cpu", torch.float32)
    trainer = DrafterTrainer(drafter, embed, rope, TrainerConfig(lr=3e-3, warmup_steps=2))
    return SpotTrainer(trainer, buf, engine.model.logits, batch_size=3, window=24, seed=seed, **kw)


def _train_records(n: int = 6) -> list[dict]:
    return [_record(20 + 2 * i, prompt_len=5, mark=i, seed=i) for i in range(n)]


def _assert_same_state(a: dict, b: dict) -> None:
    """Nested state dicts equal, tensors bitwise."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    else:
        assert a == b


class _FakeEngine:
    def __init__(self):
        self.received: list[tuple[EagleDrafter, str]] = []

    def update_drafter(self, drafter: EagleDrafter, version: str) -> None:
        self.received.append((drafter, version))


# ---------------------------------------------------------------------------------------------- buffer
def test_buffer_stays_within_its_byte_budget_and_evicts_the_oldest():
    cap = 3 * _record_bytes(30)
    buf = DrafterDataBuffer(cap)
    for i in range(12):
        assert buf.push(_record(20 + 3 * (i % 4), mark=i, seed=i))
        assert 0 < buf.nbytes <= cap
        held = [int(r["tokens"][0]) for r in buf.sample(200, torch.Generator().manual_seed(0))]
        assert max(held) == i and len(set(held)) == len(buf)  # the newest is held, the kept ones are a suffix
        assert sorted(set(held)) == list(range(i - len(buf) + 1, i + 1))
    assert buf.counts["evicted"] == 12 - len(buf)
    # a view of a larger tensor is stored as its own bytes, and counted as such
    own = DrafterDataBuffer(cap)
    own.push(dict(_record(40), aux=torch.randn(400, 192)[:40]))
    stored = own.sample(1, torch.Generator())[0]["aux"]
    assert own.nbytes == _record_bytes(40) and stored.untyped_storage().nbytes() == stored.nbytes


def test_buffer_rejects_bad_records_and_stays_unchanged():
    buf = DrafterDataBuffer(1 << 20, hidden_size=64)
    buf.push(_record(10))
    before = (len(buf), buf.nbytes)
    good = _record(10)
    bad = [
        {k: v for k, v in good.items() if k != "hidden"},
        dict(good, aux=torch.randn(10, 64)),
        dict(good, hidden=torch.randn(9, 64)),
        dict(good, tokens=good["tokens"].float()),
        dict(good, tokens=torch.tensor([3])),
        dict(good, prompt_len=11),
        dict(good, prompt_len=2.0),
        dict(good, weight_version=3),
        dict(good, hidden=torch.full((10, 64), float("nan"))),
        dict(good, aux=torch.randn(10, 96), hidden=torch.randn(10, 32)),  # another hidden size
        _record(6000),  # larger than the whole budget
        "not a record",
    ]
    for r in bad:
        with pytest.raises(ValueError):
            buf.push(r)
    assert (len(buf), buf.nbytes) == before


def test_buffer_ages_out_stale_policy_versions():
    buf = DrafterDataBuffer(1 << 22)
    for i, v in enumerate(["v1", "v1", "v2", "v3", "v2"]):
        buf.push(_record(8, version=v, mark=i))
    assert buf.age_out("v3", keep_versions=2) == 2  # v1 goes; v2 and v3 are the two newest
    kept = {r["weight_version"] for r in buf.sample(100, torch.Generator().manual_seed(0))}
    assert kept == {"v2", "v3"} and len(buf) == 3 and buf.nbytes == 3 * _record_bytes(8)
    assert not buf.push(_record(8, version="v1"))  # a late record of a stale policy is refused
    assert buf.age_out("v4", keep_versions=1) == 3 and len(buf) == 0 and buf.nbytes == 0
    assert buf.push(_record(8, version="v4"))


def test_buffer_sampling_favours_recent_records():
    buf = DrafterDataBuffer(1 << 24, recency_half_life=4)
    for i in range(32):
        buf.push(_record(6, mark=i, seed=i))
    marks = torch.tensor([int(r["tokens"][0]) for r in buf.sample(4000, torch.Generator().manual_seed(0))])
    counts = torch.bincount(marks, minlength=32).double()
    expected = torch.exp2(-(31 - torch.arange(32)).double() / 4)
    expected = 4000 * expected / expected.sum()
    assert counts[24:].sum() > 0.7 * 4000  # the newest quarter: 3/4 of the weight
    assert torch.allclose(counts, expected, rtol=0.2, atol=10)  # half as likely every 4 pushes older
    uniform = DrafterDataBuffer(1 << 24, recency_half_life=None)
    for i in range(32):
        uniform.push(_record(6, mark=i, seed=i))
    marks = torch.tensor([int(r["tokens"][0]) for r in uniform.sample(4000, torch.Generator().manual_seed(0))])
    assert torch.bincount(marks, minlength=32).min() > 60


def test_training_items_equal_target_features_labels(engine):
    """Items from captured rollout states are the data an extra target forward pass would have given."""
    prompts = [[5, 6, 7, 8], [100, 200, 300]]
    d2t = torch.arange(0, 2 * VD, 2)
    records = _decoded_records(engine, prompts, new_tokens=7)
    ref = target_features(engine, [r["tokens"].tolist() for r in records], d2t,
                          prompt_lens=[len(p) for p in prompts])
    buf = DrafterDataBuffer(1 << 24, recency_half_life=None)
    for r in records:
        buf.push(r)
    items = buf.training_items(8, engine.model.logits, d2t, torch.Generator().manual_seed(0))
    seen = set()
    for it in items:
        i = next(j for j, r in enumerate(records) if torch.equal(r["tokens"], it["tokens"]))
        seen.add(i)
        assert set(it) == set(ref[i]) and it["target_logp"].dtype == ref[i]["target_logp"].dtype
        assert torch.equal(it["loss_mask"], ref[i]["loss_mask"])
        assert torch.allclose(it["aux"], ref[i]["aux"], atol=1e-4)
        # decode steps and one whole-sequence prefill differ in float32 rounding only
        assert torch.allclose(it["target_logp"].float().exp(), ref[i]["target_logp"].float().exp(), atol=2e-3)
    assert seen == {0, 1}
    # from states of one prefill, exactly target_features' bits
    exact = DrafterDataBuffer(1 << 24)
    for r, f in zip(records, ref):
        hidden, captured = _prefill(engine, r["tokens"].tolist())
        exact.push(dict(r, hidden=hidden, aux=captured))
        it = exact.training_items(1, engine.model.logits, d2t, torch.Generator().manual_seed(0))[0]
        assert torch.equal(it["target_logp"], f["target_logp"]) and torch.equal(it["aux"], f["aux"])


def test_head_labels_equal_the_full_heads_labels(engine):
    """HeadLabels runs the LM head at the draft vocabulary's rows only: the same labels (float32 rounding)."""
    from tlt.drafter_sync.buffer import HeadLabels

    d2t = torch.arange(0, 2 * VD, 2)
    buf = DrafterDataBuffer(1 << 24, recency_half_life=None)
    for r in _decoded_records(engine, [[5, 6, 7, 8], [100, 200, 300]], new_tokens=7):
        buf.push(r)
    full = buf.training_items(2, engine.model.logits, d2t, torch.Generator().manual_seed(0))
    rows = buf.training_items(2, HeadLabels(lambda: engine.model.head_weight), d2t, torch.Generator().manual_seed(0))
    for a, b in zip(full, rows):
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.allclose(a["target_logp"].float(), b["target_logp"].float(), atol=2e-2)  # bf16 storage
        assert torch.equal(a["target_logp"].float().argmax(-1), b["target_logp"].float().argmax(-1))


def _prefill(engine, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mc = engine.model_config
    kv = KVCache(mc, engine.dtype, engine.device, capacity_bytes=(len(tokens) + 256) * engine.kv.bytes_per_token,
                 max_rows=1, max_len=len(tokens) + 128)

    class _Row:
        kv_len = 0

    kv.add(_Row(), len(tokens))
    hidden, captured = ModelRunner(engine.model, kv, engine.device).prefill(
        [tokens], 0, DrafterConfig.for_target(mc).aux_layers)
    return hidden[0], torch.cat(captured, -1)[0]


def test_training_items_crop_and_mask_only_generated_positions():
    buf = DrafterDataBuffer(1 << 24)
    buf.push(_record(200, prompt_len=150))
    head = torch.randn(1000, 64)
    items = buf.training_items(5, lambda h: h @ head.T, torch.arange(VD), torch.Generator().manual_seed(0),
                               window=32)
    for it in items:
        assert len(it["tokens"]) == 32 and it["target_logp"].shape == (32, VD) and it["aux"].shape == (32, 192)
        assert it["loss_mask"].any() and torch.allclose(it["target_logp"].float().exp().sum(-1), torch.ones(32),
                                                        atol=2e-2)


# ---------------------------------------------------------------------------------------------- spot trainer
def test_preemption_then_resume_continues_exactly(engine, tmp_path):
    records = _train_records()
    straight = _spot(engine, records)
    losses_a: list[float] = []
    res = straight.run(lambda: False, max_steps=6, after_step=lambda m: losses_a.append(m["loss"]))
    assert res["steps"] == 6 and res["stopped"] == "max_steps"

    first = _spot(engine, records)
    losses_b: list[float] = []
    res = first.run(lambda: len(losses_b) >= 3, after_step=lambda m: losses_b.append(m["loss"]))
    assert res["stopped"] == "yield" and first.steps == 3
    first.checkpoint(str(tmp_path))
    assert os.listdir(tmp_path) == ["spot_trainer.pt"]  # the temporary file was renamed
    mc = engine.model_config
    resumed = SpotTrainer.resume(str(tmp_path), mc, first.trainer.embed, first.trainer.rope, first.buffer,
                                 engine.model.logits)
    _assert_same_state(resumed.trainer.opt.state_dict(), first.trainer.opt.state_dict())
    _assert_same_state(resumed.trainer.state_dict(), first.trainer.state_dict())
    resumed.run(lambda: False, max_steps=3, after_step=lambda m: losses_b.append(m["loss"]))

    assert losses_b == losses_a
    _assert_same_state(resumed.trainer.state_dict(), straight.trainer.state_dict())
    assert resumed.stats()["steps"] == 6 and resumed.stats()["bad_steps"] == 0
    assert len(resumed.stats()["acc"]) == 3


def test_should_yield_is_asked_before_every_step(engine):
    spot = _spot(engine, _train_records())
    calls = []

    def should_yield() -> bool:
        calls.append(spot.steps)
        return len(calls) > 2

    res = spot.run(should_yield)
    assert res["stopped"] == "yield" and spot.steps == 2 and calls == [0, 1, 2]
    assert spot.run(lambda: True)["steps"] == 0 and spot.steps == 2
    assert spot.run(lambda: False, time_budget_s=0.0)["stopped"] == "time_budget"
    # No step starts that would likely end past the budget: with steps of ~50 ms, 0.12 s allows two.
    spot.train_step = lambda: (time.sleep(0.05), {"step": 0})[1]
    spot.last_step_s = 0.0
    res = spot.run(lambda: False, time_budget_s=0.12)
    assert res["steps"] == 2 and res["stopped"] == "time_budget" and res["elapsed_s"] < 0.12
    empty = _spot(engine, [])
    assert empty.run(lambda: False)["stopped"] == "no_data"


def test_poisoned_batch_is_rolled_back_and_never_published(engine, tmp_path):
    spot = _spot(engine, _train_records())
    fake = _FakeEngine()
    pub = DrafterPublisher(spot, [fake], every_steps=1, out_dir=str(tmp_path))
    spot.run(lambda: False, max_steps=2, after_step=pub.maybe_publish)
    assert [v for _, v in fake.received] == ["online-1", "online-2"]
    before = {k: v.clone() for k, v in spot.drafter.state_dict().items()}
    opt_before = copy.deepcopy(spot.trainer.opt.state_dict())

    items = spot.buffer.training_items(3, engine.model.logits, spot.drafter.d2t, torch.Generator().manual_seed(1))
    poisoned = [dict(it, aux=it["aux"].clone()) for it in items]
    poisoned[1]["aux"][3] = float("nan")
    assert spot.train_step(poisoned) is None
    assert spot.stats()["bad_steps"] == 1 and not spot.stats()["last_step_ok"]
    assert "FloatingPointError" in spot.stats()["last_error"]
    assert pub.maybe_publish() is None and pub.publish() is None and len(fake.received) == 2
    for k, v in spot.drafter.state_dict().items():
        assert torch.equal(v, before[k])
    _assert_same_state(spot.trainer.opt.state_dict(), opt_before)
    assert spot.steps == 2

    # a crash inside a step is rolled back the same way
    def crashing(h: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("label server down")

    spot.label_fn = crashing
    res = spot.run(lambda: False, max_steps=3, after_step=pub.maybe_publish)
    assert (res["steps"], res["bad_steps"], spot.steps, len(fake.received)) == (0, 3, 2, 2)
    for k, v in spot.drafter.state_dict().items():
        assert torch.equal(v, before[k])

    # training goes on from the last good state
    spot.label_fn = engine.model.logits
    spot.run(lambda: False, max_steps=1, after_step=pub.maybe_publish)
    assert [v for _, v in fake.received] == ["online-1", "online-2", "online-3"]
    assert sorted(os.listdir(tmp_path)) == ["online-1", "online-2", "online-3"]


def test_failing_steps_stop_the_run(engine):
    spot = _spot(engine, _train_records(), max_consecutive_bad=2)
    spot.label_fn = lambda h: torch.full((h.shape[0], 1000), float("nan"))
    res = spot.run(lambda: False, max_steps=10)
    assert res["stopped"] == "failing" and res["bad_steps"] == 2 and spot.steps == 0


# ---------------------------------------------------------------------------------------------- publishing
def test_published_versions_are_monotonic_copies_and_servable_folders(engine, tmp_path):
    spot = _spot(engine, _train_records())
    a, b = _FakeEngine(), _FakeEngine()
    pub = DrafterPublisher(spot, [a], out_dir=str(tmp_path))
    assert pub.publish() == "online-1"
    assert pub.publish() is None  # nothing new since
    spot.run(lambda: False, max_steps=1)
    pub.register(b)  # a late engine gets the latest published version at once
    assert [v for _, v in b.received] == ["online-1"]
    assert pub.publish() == "online-2"
    assert [v for _, v in a.received] == ["online-1", "online-2"] == [v for _, v in b.received]
    d_a, d_b = a.received[-1][0], b.received[-1][0]
    assert d_a is not d_b and d_a is not spot.drafter and d_a.cfg.version == "online-2"
    assert not any(p.requires_grad or p.grad is not None for p in d_a.parameters())
    for k, v in spot.drafter.state_dict().items():
        assert torch.equal(d_a.state_dict()[k], v)
    loaded = EagleDrafter.load(str(tmp_path / "online-2"), engine.model_config)
    assert loaded.cfg.version == "online-2"
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, d_a.state_dict()[k])
    assert sorted(os.listdir(tmp_path)) == ["online-1", "online-2"]

    # a restarted publisher over the same folder never reuses a version
    spot.run(lambda: False, max_steps=1)
    again = DrafterPublisher(spot, [a], out_dir=str(tmp_path))
    assert again.publish() == "online-3"

    # non-finite weights are never published, even after a step that looked good
    spot.run(lambda: False, max_steps=1)
    with torch.no_grad():
        spot.drafter.fc.weight[0, 0] = float("inf")
    assert again.publish() is None and len(a.received) == 3


def test_an_engine_that_refuses_does_not_block_the_others(engine):
    class _Refusing:
        def update_drafter(self, drafter, version):
            raise ValueError("wrong target")

    spot = _spot(engine, _train_records())
    ok = _FakeEngine()
    pub = DrafterPublisher(spot, [_Refusing(), ok])
    assert pub.publish() == "online-1" and pub.failures == 1 and len(ok.received) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_online_drafter_trains_the_parameters_not_a_serving_copy(tiny_models, tmp_path, dtype):
    """An OnlineDrafter started from an engine's serving drafter, whose Linears keep inference copies (float32:
    transposed; bfloat16: oneDNN-packed, opaque to deepcopy), trains every weight: a copy has no gradient, and a
    stale one would serve the old weights."""
    from tlt.engine.models.decoder import Linear

    base = tlt.Engine(tiny_models["llama"], dtype="float32")
    EagleDrafter.random(base.model_config, seed=0, draft_vocab_size=VD).save(str(tmp_path / "d"))
    base.shutdown()
    e = tlt.Engine(tiny_models["llama"], dtype=dtype, speculative_draft_model_path=str(tmp_path / "d"),
                   speculative_num_steps=2, speculative_eagle_topk=1, speculative_num_draft_tokens=3)
    serving = [m for m in e.spec.drafter.modules() if isinstance(m, Linear)]
    assert any(m.weight_t is not None or m.packed is not None or m.fp32_kernel for m in serving)  # serving paths
    od = OnlineDrafter(e)
    linears = {n: m for n, m in od.drafter.named_modules() if isinstance(m, Linear)}
    assert all(m.weight_t is None and m.packed is None and not m.fp32_kernel for m in linears.values())
    e.generate(input_ids=[[5, 6, 7, 8], [9, 10, 11]], sampling_params={"temperature": 0, "max_new_tokens": 24,
                                                                         "ignore_eos": True})
    before = {n: m.weight.detach().clone() for n, m in linears.items()}
    assert od.train_idle(max_steps=2, publish=False)["steps"] == 2
    assert all(not torch.equal(before[n], m.weight) for n, m in linears.items()), "a Linear did not train"
    od.close()
    e.shutdown()
