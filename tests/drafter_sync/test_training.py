"""Offline drafter training: the loss learns, only generated positions count, and the written folder
serves losslessly."""

from __future__ import annotations

import torch

import tlt
from tlt.drafter_sync.training import collate, crop, train_drafter, train_offline, ttt_loss
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
