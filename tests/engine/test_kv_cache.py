"""tlt/engine/kv_cache.py: rows, compaction, growth within the budget; and the same seen from the engine
(a moved or re-allocated row must decode exactly as if nothing had happened)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tlt
from tlt.engine.kv_cache import KVCache
from tlt.engine.models.model_config import ModelConfig

CFG = ModelConfig(model_type="llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2,
                  num_heads=2, num_kv_heads=2, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4,
                  rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=True,
                  attention_bias=False, qk_norm=False)
TOKEN_BYTES = 2 * 2 * 2 * 4 * 4  # K and V, 2 layers, 2 heads, head_dim 4, float32


@dataclass(eq=False)
class Seq:
    kv_len: int
    row: int = -1


def make_kv(capacity_tokens: int = 4096, max_rows: int = 64, max_len: int = 512) -> KVCache:
    return KVCache(CFG, torch.float32, "cpu", capacity_tokens * TOKEN_BYTES, max_rows, max_len)


def fill_row(kv: KVCache, row: int, value: float) -> None:
    """Position p of `row` gets value + p / 1000 in every layer (V negated), so moves are traceable."""
    pos = torch.arange(kv.alloc_len, dtype=torch.float32) / 1000
    for k, v in zip(kv.k, kv.v):
        k[row] = (value + pos).view(1, -1, 1)
        v[row] = -(value + pos).view(1, -1, 1)


def row_value(kv: KVCache, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([k[row, :, :n] for k in kv.k]), torch.stack([v[row, :, :n] for v in kv.v])


def test_budget_below_one_full_sequence_is_refused():
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        make_kv(capacity_tokens=511, max_len=512)
    assert make_kv(capacity_tokens=512, max_len=512).capacity_tokens == 512


def test_rows_are_consecutive_and_memory_is_allocated_on_demand():
    kv = make_kv()
    assert kv.allocated_bytes() == 0 and kv.num_rows == 0
    seqs = [Seq(kv_len=0) for _ in range(3)]
    for i, s in enumerate(seqs):
        assert kv.add(s, reserve_len=40) == i and s.row == i
    assert kv.owners == seqs and kv.reserved == [40, 40, 40]
    assert kv.alloc_len == 128  # lengths round up to 128, not to max_len
    assert kv.alloc_rows == 8  # rows round up to 8
    assert kv.allocated_bytes() == 8 * 128 * TOKEN_BYTES
    assert all(k.shape == (8, 2, 128, 4) for k in kv.k + kv.v)


def test_reservation_accounting_and_admission():
    kv = make_kv(capacity_tokens=2048, max_rows=64)
    kv.add(Seq(0), 100)
    kv.add(Seq(0), 200)
    # footprint of the dense layout: rows x longest reservation rounded up to 128
    assert kv.reserved_tokens() == 2 * 256
    assert kv.reserved_tokens(extra_rows=1, extra_len=300) == 3 * 384
    assert kv.can_admit(6, 100)  # 8 x 256 = 2048
    assert not kv.can_admit(7, 100)  # 9 x 256 > 2048
    assert kv.can_admit(3, 300)  # 5 x 384 = 1920
    assert not kv.can_admit(4, 300)  # 6 x 384 > 2048
    for _ in range(6):
        kv.add(Seq(0), 10)
    assert not kv.can_admit(1, 1)  # the budget is full at 8 x 256
    assert kv.alloc_rows * kv.alloc_len <= kv.capacity_tokens
    few = make_kv(capacity_tokens=10**6, max_rows=6)
    for _ in range(6):
        few.add(Seq(0), 1)
    assert not few.can_admit(1, 1)  # max_rows
    assert few.alloc_rows == 6


def test_growth_in_length_that_needs_fewer_allocated_rows_keeps_the_running_rows():
    kv = make_kv(capacity_tokens=1024, max_rows=64)
    a = Seq(kv_len=50)
    kv.add(a, 60)  # allocates 8 rows x 128 = the whole budget
    fill_row(kv, 0, 3.0)
    want = row_value(kv, 0, 51)
    kv.add(Seq(0), 200)  # 2 rows x 256 fit the budget (can_admit says yes) but 8 x 256 do not
    got = row_value(kv, 0, 51)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert kv.alloc_rows * kv.alloc_len <= kv.capacity_tokens


def test_removing_a_row_moves_the_last_row_into_the_hole_intact():
    kv = make_kv()
    seqs = [Seq(kv_len=n) for n in (5, 9, 3, 7)]
    for s in seqs:
        kv.add(s, 64)
    for r in range(4):
        fill_row(kv, r, 10.0 * (r + 1))
    last_k, last_v = row_value(kv, 3, 7 + 1)
    kv.remove(seqs[1])
    assert seqs[1].row == -1 and kv.num_rows == 3
    assert kv.owners == [seqs[0], seqs[3], seqs[2]] and seqs[3].row == 1
    k, v = row_value(kv, 1, 8)  # the moved row's written positions (+1 for a speculative write-ahead)
    assert torch.equal(k, last_k) and torch.equal(v, last_v)
    assert kv.reserved == [64, 64, 64]
    # rows that did not move are untouched
    assert torch.equal(row_value(kv, 0, 5)[0], torch.stack([torch.full((2, 5, 4), 10.0)] * 2)
                       + (torch.arange(5) / 1000).view(1, 1, 5, 1))
    # removing the last row moves nothing
    before = [k.clone() for k in kv.k]
    kv.remove(seqs[2])
    assert kv.owners == [seqs[0], seqs[3]] and all(torch.equal(a, b) for a, b in zip(kv.k, before))


def test_growth_keeps_every_written_value():
    kv = make_kv(capacity_tokens=64 * 512, max_rows=64)
    seqs = [Seq(kv_len=100) for _ in range(8)]
    for s in seqs:
        kv.add(s, 100)
    for r in range(8):
        fill_row(kv, r, float(r + 1))
    old = [k.clone() for k in kv.k] + [v.clone() for v in kv.v]
    assert (kv.alloc_rows, kv.alloc_len) == (8, 128)
    kv.add(Seq(0), 300)  # a ninth row and a longer reservation: both dimensions grow
    assert kv.alloc_rows >= 9 and kv.alloc_len >= 384
    assert kv.alloc_rows * kv.alloc_len <= kv.capacity_tokens
    for new, prev in zip(kv.k + kv.v, old):
        assert torch.equal(new[:8, :, :128], prev)
        assert torch.all(new[8:] == 0) and torch.all(new[:, :, 128:] == 0)


def test_growth_never_exceeds_the_budget():
    kv = make_kv(capacity_tokens=1000, max_rows=64, max_len=256)
    while kv.can_admit(1, 200):
        kv.add(Seq(0), 200)
        assert kv.alloc_rows * kv.alloc_len <= kv.capacity_tokens
    assert kv.num_rows == 3  # 3 x 256 <= 1000 < 4 x 256


def test_copy_prefix_copies_exactly_the_prompt():
    kv = make_kv()
    a, b = Seq(6), Seq(0)
    kv.add(a, 40)
    kv.add(b, 40)
    fill_row(kv, 0, 5.0)
    fill_row(kv, 1, -7.0)
    kv.copy_prefix(0, 1, 6)
    assert torch.equal(row_value(kv, 1, 6)[0], row_value(kv, 0, 6)[0])
    assert torch.equal(row_value(kv, 1, 6)[1], row_value(kv, 0, 6)[1])
    assert torch.all(kv.k[0][1, :, 6:] < 0)  # beyond the prompt: untouched


def test_clear_releases_everything():
    kv = make_kv()
    kv.add(Seq(0), 10)
    kv.clear()
    assert kv.num_rows == 0 and kv.allocated_bytes() == 0 and kv.k == [] and kv.reserved == []


# ---------------------------------------------------------------- seen from the engine
def _prompts(lens, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, 49152, (n,), generator=g).tolist() for n in lens]


def _greedy(n):
    return {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}


@pytest.fixture(scope="module")
def eng(tiny_models):
    e = tlt.Engine(tiny_models["qwen3"], dtype="float32", device="cpu", random_seed=0, kv_cache_bytes=1 << 24)
    yield e
    e.shutdown()


def test_a_moved_row_decodes_as_if_it_had_not_moved(eng):
    """Tokens equal and logprobs within 1e-5 of uninterrupted runs: any K/V lost in the move shows."""
    pa, pb, pc = _prompts((7, 12, 20), seed=40)

    def run(p, n, **kw):
        return eng.generate(input_ids=p, sampling_params=_greedy(n), return_logprob=True, **kw)

    want_b, want_c = run(pb, 10), run(pc, 10)
    assert eng.flush_cache()  # zero K/V: stale rows of the reference runs must not mask a lost position
    it_a = run(pa, 2, stream=True, rid="kv-a")
    it_b = run(pb, 10, stream=True, rid="kv-b")
    it_c = run(pc, 10, stream=True, rid="kv-c")
    next(it_a)  # prefill: rows a=0, b=1, c=2
    seq_c = eng.scheduler.groups["kv-c"].seqs[0]
    assert seq_c.row == 2
    assert list(it_a)[-1]["meta_info"]["completion_tokens"] == 2  # a leaves after one decode step
    assert eng.kv.num_rows == 2 and seq_c.row == 0  # c moved into a's row
    for it, want in ((it_b, want_b), (it_c, want_c)):
        got = list(it)[-1]
        assert got["output_ids"] == want["output_ids"]
        lp = [x[0] for x in got["meta_info"]["output_token_logprobs"]]
        ref = [x[0] for x in want["meta_info"]["output_token_logprobs"]]
        assert torch.allclose(torch.tensor(lp), torch.tensor(ref), atol=1e-5)


def test_a_cache_that_grows_mid_decode_keeps_the_running_rows(eng, tiny_models):
    e = tlt.Engine(tiny_models["qwen3"], dtype="float32", device="cpu", random_seed=0, kv_cache_bytes=1 << 24)
    try:
        first = _prompts((9,), seed=41)[0]
        later = _prompts((3, 5, 8, 2, 6, 4, 7, 3, 5), seed=42)
        long_p = _prompts((150,), seed=43)[0]
        want = eng.generate(input_ids=first, sampling_params=_greedy(12))["output_ids"]
        want_later = [o["output_ids"] for o in eng.generate(input_ids=later, sampling_params=_greedy(6))]
        want_long = eng.generate(input_ids=long_p, sampling_params=_greedy(4))["output_ids"]
        it = e.generate(input_ids=first, sampling_params=_greedy(12), stream=True)
        for _ in range(4):
            next(it)
        shape = (e.kv.alloc_rows, e.kv.alloc_len)
        assert shape == (8, 128)
        outs = e.generate(input_ids=later + [long_p], sampling_params=[_greedy(6)] * 9 + [_greedy(4)])
        assert e.kv.alloc_rows > 8 and e.kv.alloc_len > 128  # both grew while `first` was decoding
        assert [o["output_ids"] for o in outs] == want_later + [want_long]
        assert list(it)[-1]["output_ids"] == want
        assert e.kv.allocated_bytes() <= 1 << 24
    finally:
        e.shutdown()


def test_admitting_a_long_reservation_into_a_full_budget_spares_the_running(tiny_models):
    # qwen3 tiny: 1024 bytes of K/V per token; 1024 tokens of budget, context 256.
    e = tlt.Engine(tiny_models["qwen3"], dtype="float32", device="cpu", random_seed=0,
                   kv_cache_bytes=1024 * 1024, context_length=256)
    try:
        pa, pb = _prompts((10, 10), seed=44)
        it = e.generate(input_ids=pa, sampling_params=_greedy(20), stream=True)
        next(it)
        assert e.kv.can_admit(1, 200)  # admission says the long request fits
        out = e.generate(input_ids=pb, sampling_params=_greedy(190))
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        assert list(it)[-1]["meta_info"]["finish_reason"]["type"] == "length"
    finally:
        e.shutdown()


def test_an_admitted_batch_is_allocated_once(tiny_models):
    """Rows added one by one would grow the tensors 8 -> 16 -> 32 -> 48 rows; the scheduler reserves the
    whole admitted batch (siblings included) first."""
    e = tlt.Engine(tiny_models["llama"], dtype="float32", device="cpu", random_seed=0)
    try:
        outs = e.generate(input_ids=_prompts([4 + i % 7 for i in range(20)], seed=5),
                          sampling_params={**_greedy(3), "n": 2})
        assert len(outs) == 40 and e.kv.allocations == 1 and e.kv.alloc_rows == 40
    finally:
        e.shutdown()
