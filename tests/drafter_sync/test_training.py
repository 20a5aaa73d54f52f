"""Offline drafter training: the loss learns, only generated positions count, and the written folder
serves losslessly."""

from __future__ import annotations

import pytest
import torch

import tlt
from tlt.drafter_sync.prompts import self_instruct_prompts
from tlt.drafter_sync.training import (
    collate,
    crop,
    evaluate_items,
    expected_tokens,
    train_drafter,
    train_offline,
    ttt_loss,
)
from tlt.engine.models.rope import RotaryTable
from tlt.engine.spec.drafter import EagleDrafter


def _toy_data(mc, n=6, T=24, Vd=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = mc.hidden_size
    items = []
    for _ in range(n):
        tok = torch.randint(0, 200, (T,), generator=g)
        # a learnable rule: the label of position p is token p+2 (in draft ids), given as a hard target
        lab = torch.full((T, Vd), -30.0)
        nxt = torch.roll(tok, -1) % Vd
        lab[torch.arange(T), nxt] = 0.0
        items.append({"tokens": tok, "aux": torch.randn(T, 3 * H, generator=g),
                      "target_logp": torch.log_softmax(lab, -1).bfloat16(),
                      "loss_mask": torch.arange(T) >= 4})
    return items


def test_ttt_loss_learns_and_respects_the_loss_mask(tiny_models):
    e = tlt.Engine(tiny_models["llama"], dtype="float32")
    mc = e.model_config
    data = _toy_data(mc)
    drafter = EagleDrafter.random(mc, seed=0, draft_vocab_size=64)
    embed = torch.nn.Embedding.from_pretrained(e.model.embed.weight.detach().float())
    rope = RotaryTable(mc.head_dim, mc.rope_theta, mc.rope_scaling, 64, "cpu", torch.float32)
    before, _ = ttt_loss(drafter, embed, rope, collate(data), steps=3)
    train_drafter(drafter, embed, rope, data, steps=3, max_steps=60, batch_size=6, lr=3e-3, log=lambda m: None)
    with torch.no_grad():
        after, accs = ttt_loss(drafter, embed, rope, collate(data), steps=3)
    assert float(after) < 0.5 * float(before.detach())
    # masked positions do not count: corrupting their labels leaves the loss unchanged
    bad = [dict(x, target_logp=x["target_logp"].clone()) for x in data]
    for x in bad:
        x["target_logp"][:5] = torch.log_softmax(torch.randn(5, 64), -1).bfloat16()
    with torch.no_grad():
        again, _ = ttt_loss(drafter, embed, rope, collate(bad), steps=3)
    assert torch.allclose(after, again)
    e.shutdown()


def test_crop_keeps_generated_positions():
    item = {"tokens": torch.arange(100), "aux": torch.zeros(100, 3), "target_logp": torch.zeros(100, 2),
            "loss_mask": torch.arange(100) >= 70}
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        c = crop(item, 20, g)
        assert len(c["tokens"]) == 20 and c["loss_mask"].any()
        assert torch.equal(c["tokens"][c["loss_mask"]], c["tokens"][c["tokens"] >= 70])


def test_train_offline_writes_a_drafter_that_serves_losslessly(tiny_models, tmp_path):
    base = tlt.Engine(tiny_models["qwen3"], dtype="float32", random_seed=0)
    res = train_offline(base, str(tmp_path), num_prompts=4, max_new_tokens=8, max_steps=3, draft_vocab_size=512,
                        batch_size=2, log=lambda m: None)
    assert res["step"] == 3 and res["generated_tokens"] > 0
    assert len(res["heldout_acc"]) == 3 and res["heldout_expected_tokens"] >= 1.0  # one record held out
    prompts = [[5, 6, 7], [100, 200, 300, 400]]
    sp = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    ref = base.generate(input_ids=prompts, sampling_params=sp)
    e = tlt.Engine(tiny_models["qwen3"], dtype="float32", speculative_draft_model_path=str(tmp_path),
                   speculative_num_steps=3, speculative_eagle_topk=2, speculative_num_draft_tokens=5)
    assert e.get_model_info()["drafter_version"].startswith("offline-")
    out = e.generate(input_ids=prompts, sampling_params=sp)
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
    e.shutdown()
    base.shutdown()


def test_evaluate_items_in_chunks_equals_one_batch(tiny_models):
    e = tlt.Engine(tiny_models["llama"], dtype="float32")
    mc = e.model_config
    data = _toy_data(mc, n=7, T=20)
    data[3] = {k: v[:11] for k, v in data[3].items()}  # mixed lengths: padding must not count
    drafter = EagleDrafter.random(mc, seed=1, draft_vocab_size=64)
    embed = torch.nn.Embedding.from_pretrained(e.model.embed.weight.detach().float())
    rope = RotaryTable(mc.head_dim, mc.rope_theta, mc.rope_scaling, 64, "cpu", torch.float32)
    train_drafter(drafter, embed, rope, data, steps=3, max_steps=30, batch_size=6, lr=3e-3, log=lambda m: None)
    with torch.no_grad():
        _, whole = ttt_loss(drafter, embed, rope, collate(data), steps=3)
    chunked = evaluate_items(drafter, embed, rope, data, steps=3, chunk=3)
    assert max(whole) > 0.2  # learnt something, so the comparison is not between zeros
    assert all(abs(a - b) < 1e-6 for a, b in zip(whole, chunked))
    assert expected_tokens([0.5, 0.5]) == 1.75 and expected_tokens([]) == 1.0
    e.shutdown()


def test_train_drafter_logs_held_out_agreement(tiny_models):
    e = tlt.Engine(tiny_models["llama"], dtype="float32")
    mc = e.model_config
    data = _toy_data(mc, n=8)
    drafter = EagleDrafter.random(mc, seed=0, draft_vocab_size=64)
    embed = torch.nn.Embedding.from_pretrained(e.model.embed.weight.detach().float())
    rope = RotaryTable(mc.head_dim, mc.rope_theta, mc.rope_scaling, 64, "cpu", torch.float32)
    lines = []
    res = train_drafter(drafter, embed, rope, data[:6], steps=2, max_steps=10, batch_size=4, lr=3e-3,
                        log=lines.append, heldout=data[6:], eval_every=4)
    assert sum("held-out" in x for x in lines) == 3  # steps 4, 8 and the last
    assert res["heldout_acc"] == evaluate_items(drafter, embed, rope, data[6:], steps=2)
    assert res["heldout_expected_tokens"] == expected_tokens(res["heldout_acc"])
    e.shutdown()


class _FakeWriter:
    """An engine stand-in whose 'user turns' repeat, run long, or are too short."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls = tokenizer, texts, []

    def generate(self, input_ids, sampling_params):
        self.calls.append(sampling_params)
        out = []
        for sp in sampling_params:
            text, kind = self.texts[sp["sampling_seed"] % len(self.texts)]
            out.append({"text": text, "meta_info": {"finish_reason": {"type": kind}}})
        return out


def test_self_instruct_prompts_keep_distinct_finished_messages(tiny_models):
    tok = tlt.Engine(tiny_models["llama"], dtype="float32").tokenizer
    texts = [("How do tides work?", "stop"), ("How do tides work?", "stop"), ("short", "stop"),
             ("A message cut off by the length limit", "length"), ("Why is the sky blue?", "stop"),
             (" Name three rivers in Africa. ", "stop")]
    fake = _FakeWriter(tok, texts)
    got = self_instruct_prompts(fake, 3, seed=0, log=lambda m: None, batch=4)
    assert got == ["How do tides work?", "Why is the sky blue?", "Name three rivers in Africa."]
    seeds = [sp["sampling_seed"] for call in fake.calls for sp in call]
    assert len(set(seeds)) == len(seeds)  # every draw its own seed: no repeated samples
    with pytest.raises(RuntimeError, match="usable distinct"):
        self_instruct_prompts(_FakeWriter(tok, [("x", "stop")]), 2, log=lambda m: None, batch=64)
