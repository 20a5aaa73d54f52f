"""tlt/engine/scheduler.py: FIFO admission by KV reservation within the prefill budget, rows freed at
once on finish and abort; and admission seen from the engine (waiting requests run when rows free)."""

from __future__ import annotations

import pytest
import torch

import tlt
from tlt.engine.kv_cache import KVCache
from tlt.engine.models.model_config import ModelConfig
from tlt.engine.request import RequestGroup, SeqStatus, Sequence
from tlt.engine.sampling_params import SamplingParams
from tlt.engine.scheduler import Scheduler

CFG = ModelConfig(model_type="llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4,
                  rope_scaling=None, max_position_embeddings=1024, tie_word_embeddings=True,
                  attention_bias=False, qk_norm=False)
TOKEN_BYTES = 2 * 1 * 1 * 4 * 4


def make_scheduler(capacity_tokens=1024, max_rows=64, max_len=512, max_prefill_tokens=8192) -> Scheduler:
    kv = KVCache(CFG, torch.float32, "cpu", capacity_tokens * TOKEN_BYTES, max_rows, max_len)
    return Scheduler(kv, max_prefill_tokens, context_length=max_len)


def group(rid: str, prompt_len: int, max_new: int, n: int = 1) -> RequestGroup:
    g = RequestGroup(rid=rid, prompt_ids=[5] * prompt_len, params=SamplingParams(n=n, max_new_tokens=max_new),
                     max_new_tokens=max_new, return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
                     return_text_in_logprobs=False, stream=False, on_update=lambda g, f: None)
    g.seqs = [Sequence(seq_id=f"{rid}-{i}", group=g, sample_index=i) for i in range(n)]
    return g


def rids(groups) -> list[str]:
    return [g.rid for g in groups]


def test_admission_by_reservation_fifo():
    s = make_scheduler(capacity_tokens=512)  # 4 rows of 128
    gs = [group(f"g{i}", 10, 100) for i in range(6)]  # each reserves 110 -> 128
    for g in gs:
        s.add(g)
    assert rids(s.admit()) == ["g0", "g1", "g2", "g3"]
    assert [g.seqs[0].row for g in gs[:4]] == [0, 1, 2, 3]
    assert all(g.seqs[0].status is SeqStatus.RUNNING for g in gs[:4])
    assert rids(s.waiting) == ["g4", "g5"] and s.admit() == []
    s.finish(gs[1].seqs[0], {"type": "length"})  # frees its row at once
    assert s.kv.num_rows == 3 and "g1" not in s.groups
    assert rids(s.admit()) == ["g4"]
    assert rids(s.waiting) == ["g5"]


def test_the_longest_reservation_sets_every_row_footprint():
    s = make_scheduler(capacity_tokens=1024)
    s.add(group("long", 10, 300))  # 310 -> 384 positions, for every row of the dense layout
    s.add(group("short", 10, 20))
    s.add(group("short2", 10, 20))
    assert rids(s.admit()) == ["long", "short"]  # a third row: 3 x 384 > 1024, though it needs only 30
    assert rids(s.waiting) == ["short2"]


def test_the_head_of_the_queue_blocks_the_rest():
    s = make_scheduler(capacity_tokens=512)
    s.add(group("a", 10, 300))  # 384
    s.add(group("big", 10, 400))  # 2 x 512 > 512: must wait for a
    s.add(group("small", 2, 2))  # would fit, but FIFO keeps order
    assert rids(s.admit()) == ["a"]
    assert rids(s.waiting) == ["big", "small"]


def test_n_samples_reserve_n_rows_and_fork_after_the_prefill():
    s = make_scheduler(capacity_tokens=512)
    g3 = group("n3", 10, 50, n=3)
    g2 = group("n2", 10, 50, n=2)  # 3 + 2 rows > 4
    s.add(g3)
    s.add(g2)
    assert rids(s.admit()) == ["n3"]
    assert s.kv.num_rows == 1 and [q.row for q in g3.seqs] == [0, -1, -1]  # siblings wait for the prefill
    for k in s.kv.k + s.kv.v:
        k[0, :, :10] = torch.arange(10.0).view(1, 10, 1)
    s.fork_siblings(g3)
    assert [q.row for q in g3.seqs] == [0, 1, 2] and all(q.status is SeqStatus.RUNNING for q in g3.seqs)
    for k in s.kv.k + s.kv.v:
        assert torch.equal(k[1, :, :10], k[0, :, :10]) and torch.equal(k[2, :, :10], k[0, :, :10])
    assert s.admit() == []  # 3 + 2 rows still exceed the budget


def test_prefill_budget_counts_padded_tokens():
    s = make_scheduler(capacity_tokens=10**5, max_len=1024, max_prefill_tokens=100)
    for rid, n in (("a", 30), ("b", 10), ("c", 40), ("d", 5)):
        s.add(group(rid, n, 4))
    assert rids(s.admit()) == ["a", "b"]  # with c: 3 x 40 padded tokens > 100, so c waits
    assert rids(s.admit()) == ["c", "d"]
    s.add(group("huge", 300, 4))  # longer than the budget: runs alone
    s.add(group("e", 3, 4))
    assert rids(s.admit()) == ["huge"]
    assert rids(s.admit()) == ["e"]


def test_max_rows_limits_admission():
    s = make_scheduler(capacity_tokens=10**5, max_rows=3)
    for i in range(4):
        s.add(group(f"g{i}", 5, 5))
    assert rids(s.admit()) == ["g0", "g1", "g2"]
    assert not s.fits_ever(group("wide", 5, 5, n=4))
    assert s.fits_ever(group("ok", 5, 5, n=3))


def test_reservation_is_clipped_to_the_context_and_fits_ever():
    s = make_scheduler(capacity_tokens=1024, max_len=512)
    assert s.reserve_len(group("x", 100, 10**6)) == 512
    assert s.fits_ever(group("two", 100, 400, n=2))  # 2 x 512 = 1024
    assert not s.fits_ever(group("three", 100, 400, n=3))


def test_abort_removes_waiting_and_running_groups_and_frees_rows():
    s = make_scheduler(capacity_tokens=256, max_len=128)
    a, b, c = group("a", 5, 50), group("b", 5, 50), group("c", 5, 50)
    for g in (a, b, c):
        s.add(g)
    s.admit()
    assert s.kv.num_rows == 2 and rids(s.waiting) == ["c"]
    assert rids(s.abort("c", "bye")) == ["c"]
    assert not s.waiting and c.aborted and c.seqs[0].finish_reason == {"type": "abort", "message": "bye"}
    assert rids(s.abort("a", "bye")) == ["a"] and s.kv.num_rows == 1 and b.seqs[0].row == 0
    assert s.abort("nobody", "bye") == []
    assert rids(s.abort(None, "all")) == ["b"]
    assert s.kv.num_rows == 0 and not s.groups and not s.has_work()


# ---------------------------------------------------------------- seen from the engine
def test_engine_admits_by_reservation_and_runs_the_waiting_when_rows_free(tiny_models):
    # qwen3 tiny: 1024 bytes of K/V per token. Budget 256 tokens, context 128: two rows of 128.
    e = tlt.Engine(tiny_models["qwen3"], dtype="float32", device="cpu", random_seed=0,
                   kv_cache_bytes=256 * 1024, context_length=128)
    try:
        g = torch.Generator().manual_seed(50)
        prompts = [torch.randint(20, 49152, (n,), generator=g).tolist() for n in (6, 9, 4)]
        sps = [{"temperature": 0, "max_new_tokens": m, "ignore_eos": True} for m in (3, 8, 5)]
        alone = [e.generate(input_ids=p, sampling_params=sp)["output_ids"] for p, sp in zip(prompts, sps)]
        its = [e.generate(input_ids=p, sampling_params=sp, stream=True) for p, sp in zip(prompts, sps)]
        e.step()  # one prefill: the first two fit, the third waits
        assert e.kv.num_rows == 2 and len(e.scheduler.waiting) == 1
        rows_seen = []
        while e.step():
            rows_seen.append(e.kv.num_rows)
        assert max(rows_seen) == 2 and e.kv.allocated_bytes() <= 256 * 1024
        assert [list(it)[-1]["output_ids"] for it in its] == alone
        with pytest.raises(ValueError, match="KV memory"):  # could never fit: refused, not queued forever
            e.generate(input_ids=prompts[0], sampling_params={"max_new_tokens": 50, "n": 3})
    finally:
        e.shutdown()
