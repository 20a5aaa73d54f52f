"""The graph pool's policy on CPU: what gets captured, what is evicted, the byte budget, padding, eager runs.

A fake capturer stands in for CUDA: it "captures" by remembering the function, and keeps its own device
ledger (static buffers of live graphs + a workspace that grows to the largest working set captured), so
that the pool's accounting is checked against an independent figure rather than against itself.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from tlt.engine.cuda_graphs import (
    EagerCapturer,
    GraphKey,
    GraphPool,
    Warmup,
    batch_buckets,
    bucket_for,
    keys_for_arm,
    pad_rows,
)
from tlt.engine.spec.worker import SpecConfig


def _tokens(key: GraphKey) -> int:
    return key.shape if isinstance(key.shape, int) else key.shape[0] * key.shape[1]


def default_size(key: GraphKey) -> tuple[int, int]:
    """(static bytes, peak working set) of a key: proportional to rows x tokens per row."""
    return key.bucket * _tokens(key) * 100, key.bucket * _tokens(key) * 300


class FakeGraph:
    def __init__(self, dev: FakeCapturer, key: GraphKey, fn, static_bytes: int):
        self.dev, self.key, self.fn, self.static_bytes = dev, key, fn, static_bytes

    def replay(self, inputs):
        self.dev.replays[self.key] += 1
        return self.fn(*inputs)

    def release(self):
        self.dev.allocated -= self.static_bytes
        self.dev.live.remove(self.key)
        if not self.dev.live:
            self.dev.workspace = 0  # the shared pool goes back with its last graph


class FakeCapturer:
    """Captures nothing real; `size(key)` gives what a warm-up measures, `extra(key)` -> (static, workspace)
    bytes a capture takes beyond that (the allocator's rounding, which a warm-up cannot see)."""

    def __init__(self, size=default_size, extra=lambda key: (0, 0)):
        self.size, self.extra = size, extra
        self.allocated = 0  # static buffers of live graphs
        self.workspace = 0  # the shared pool: the largest working set captured so far
        self.live: list[GraphKey] = []
        self.captured: list[GraphKey] = []
        self.warmups: Counter = Counter()
        self.replays: Counter = Counter()

    @property
    def device_bytes(self) -> int:
        return self.allocated + self.workspace

    def warm_up(self, key, fn, inputs):
        self.warmups[key] += 1
        static, peak = self.size(key)
        return Warmup(key, fn, inputs, fn(*inputs), static, peak)

    def capture(self, warm):
        static, peak = self.size(warm.key)
        more_static, more_workspace = self.extra(warm.key)
        static += more_static
        self.allocated += static
        self.workspace = max(self.workspace, peak + more_workspace)
        self.live.append(warm.key)
        self.captured.append(warm.key)
        return FakeGraph(self, warm.key, warm.fn, static)

    def workspace_bytes(self):
        return self.workspace


def double(x):
    return x * 2


X = (torch.arange(8.0).view(8, 1),)
A = SpecConfig(3, 1, 4)
B = SpecConfig(2, 2, 4)  # same draft-token count as A
C = SpecConfig(3, 1, 6)  # same steps and topk as A, more draft tokens


def build(key):
    return double, X


def test_keys_for_arm():
    assert keys_for_arm(None, 8) == (GraphKey("decode", 8, 1),)
    assert keys_for_arm(A, 8) == (GraphKey("catch_up", 8, 4), GraphKey("draft", 8, (3, 1)), GraphKey("verify", 8, 4))
    # One draft step needs no drafter pass beyond catch-up.
    assert keys_for_arm(SpecConfig(1, 1, 2), 4) == (GraphKey("catch_up", 4, 2), GraphKey("verify", 4, 2))
    with pytest.raises(ValueError, match="phase"):
        GraphKey("prefill", 8, 1)
    with pytest.raises(ValueError, match="bucket"):
        GraphKey("decode", 0, 1)


def test_plan_captures_only_allowed_pairs_and_every_decode_bucket():
    dev = FakeCapturer()
    buckets = batch_buckets(16)
    pool = GraphPool(dev, 10**9, buckets)
    pool.plan([(8, A)], build)
    decode = {GraphKey("decode", b, 1) for b in buckets}
    assert set(pool.held) == decode | set(keys_for_arm(A, 8))
    assert len(dev.captured) == len(pool.held)  # nothing captured and dropped
    # Decode first, largest bucket first (the workspace is sized by the largest working set).
    assert dev.captured[: len(buckets)] == [GraphKey("decode", b, 1) for b in reversed(buckets)]
    assert [k.bucket for k in dev.captured[len(buckets):]] == [8, 8, 8]
    # A pair the selector may not choose runs eagerly and is never captured.
    out = pool.run(GraphKey("verify", 4, 4), double, X)
    assert torch.equal(out, X[0] * 2)
    assert pool.counts["eager_runs"] == 1 and dev.warmups[GraphKey("verify", 4, 4)] == 0
    assert GraphKey("verify", 4, 4) not in pool.held
    with pytest.raises(ValueError, match="bucket 5"):
        pool.plan([(5, A)])


def test_verify_graph_shared_between_arms_with_equal_draft_tokens():
    assert keys_for_arm(A, 8)[-1] == keys_for_arm(B, 8)[-1] != keys_for_arm(C, 8)[-1]
    dev = FakeCapturer()
    pool = GraphPool(dev, 10**9, (1, 8))
    pool.plan([(8, A), (8, B)], build)
    verify = [k for k in dev.captured if k.phase == "verify"]
    assert verify == [GraphKey("verify", 8, 4)]
    # 2 decode + catch-up (4 and 3 tokens) + draft ((3, 1) and (2, 2)) + one shared verify.
    assert len(pool.held) == 7
    graph = pool.held[GraphKey("verify", 8, 4)]
    for arm in (A, B):
        pool.run(keys_for_arm(arm, 8)[-1], double, X)
    assert pool.held[GraphKey("verify", 8, 4)] is graph and dev.replays[GraphKey("verify", 8, 4)] == 2
    assert len(dev.captured) == 7

    fp = GraphPool(FakeCapturer(), 10**9, (1, 2, 4, 8, 16)).footprint([A, B])
    # Per bucket: decode 1, catch-up 2, draft 2, verify 1 (shared) = 6, against 1 + 3 + 3 unshared.
    assert fp["graphs_all"] == 30 and fp["graphs_all_unshared"] == 35 and fp["pairs"] == 15
    assert fp["unmeasured_all"] == 30


def test_footprint_reports_measured_bytes_of_every_pair():
    dev = FakeCapturer()
    pool = GraphPool(dev, 10**9, (1, 8))
    pool.plan([(b, arm) for b in (1, 8) for arm in (A, C)], build)
    fp = pool.footprint([A, C])
    assert fp["unmeasured_all"] == 0 and fp["graphs_all"] == fp["graphs_held"] == len(dev.captured)
    assert fp["bytes_all"] == fp["bytes_held"] == dev.device_bytes
    small = GraphPool(FakeCapturer(), 0, (1, 8))
    small.plan([(8, A)])
    assert small.footprint([A])["unmeasured_all"] == len({k for b in (1, 8) for a in (None, A)
                                                          for k in keys_for_arm(a, b)})


def test_budget_never_exceeded_in_a_random_sequence():
    rng = random.Random(1234)
    # One capture in five takes more than its warm-up measured (static rounding or workspace growth).
    surprises = {}

    def extra(key):
        surprises.setdefault(key, rng.choice([(0, 0)] * 8 + [(3000, 0), (0, 40000)]))
        return surprises[key]

    dev = FakeCapturer(extra=extra)
    buckets = batch_buckets(16)
    arms = [None, A, B, C, SpecConfig(1, 1, 2), SpecConfig(5, 4, 8)]
    budget = 60_000
    pool = GraphPool(dev, budget, buckets, half_life=32)
    pool.plan([(b, a) for b in buckets for a in arms[1:4]])
    for step in range(3000):
        if rng.random() < 0.01:
            pool.plan([(b, a) for b in buckets for a in arms if a is not None and rng.random() < 0.5])
        else:
            bs = rng.randint(1, 16)
            arm = rng.choice(arms)
            key = rng.choice(keys_for_arm(arm, bucket_for(bs, buckets)))
            x = torch.full((key.bucket, 1), float(step))
            assert torch.equal(pool.run(key, double, (x,)), x * 2)
        assert dev.device_bytes <= budget, step
        assert pool.bytes == dev.device_bytes, step
        assert set(pool.held) == set(dev.live), step
    c = pool.counts
    # The sequence exercised every path, eviction and settling after a surprise included.
    assert c["captures"] > 50 and c["evictions"] > 20 and c["hits"] > 500 and c["eager_runs"] > 100, c
    assert any(s != (0, 0) for k, s in surprises.items() if k in dev.captured)


def test_eviction_picks_the_least_useful_and_never_a_decode_graph():
    dev = FakeCapturer(size=lambda key: (100, 0))
    pool = GraphPool(dev, 300, (8,), half_life=float("inf"))  # exact counts
    a, c = SpecConfig(1, 1, 4), SpecConfig(1, 1, 6)  # catch_up(8, 2) shared, verify(8, 4) / verify(8, 6)
    pool.plan([(8, a), (8, c)])
    decode, catch_up, v4, v6 = (GraphKey("decode", 8, 1), GraphKey("catch_up", 8, 2), GraphKey("verify", 8, 4),
                                GraphKey("verify", 8, 6))
    pool.run(decode, double, X)
    for _ in range(10):
        pool.run(v4, double, X)
    for _ in range(2):
        pool.run(catch_up, double, X)
    assert set(pool.held) == {decode, catch_up, v4} and pool.bytes == 300
    # verify(8, 6) must be more than twice as useful as what it displaces (catch-up, used twice): its fifth
    # run. Runs 2-4 know from the first warm-up that it does not fit, and skip the warm-up.
    for i in range(5):
        pool.run(v6, double, X)
        assert (v6 in pool.held) == (i == 4)
    assert set(pool.held) == {decode, v4, v6}  # decode, the least used of all, stays
    assert pool.counts["evictions"] == 1 and dev.warmups[v6] == 2
    assert pool.counts["eager_runs"] == 4 and pool.counts["misses"] == 3 + 5  # first runs of the other three


def test_decode_graph_displaces_spec_graphs_whatever_their_use():
    dev = FakeCapturer(size=lambda key: (100, 0))
    pool = GraphPool(dev, 200, (4, 8))
    pool.plan([(8, SpecConfig(1, 1, 4))])
    for _ in range(20):
        pool.run(GraphKey("catch_up", 8, 2), double, X)
        pool.run(GraphKey("verify", 8, 4), double, X)
    assert len(pool.held) == 2
    pool.run(GraphKey("decode", 4, 1), double, X)
    assert GraphKey("decode", 4, 1) in pool.held and len(pool.held) == 2 and pool.counts["evictions"] == 1


def test_two_alternating_arms_do_not_recapture_every_step():
    dev = FakeCapturer(size=lambda key: (100, 0))
    pool = GraphPool(dev, 100, (8,))
    pool.plan([(8, SpecConfig(1, 1, 4)), (8, SpecConfig(1, 1, 6))])
    for _ in range(200):
        pool.run(GraphKey("verify", 8, 4), double, X)
        pool.run(GraphKey("verify", 8, 6), double, X)
    assert len(dev.captured) == 1 and pool.counts["evictions"] == 0
    assert pool.counts["hits"] == 199 and pool.counts["eager_runs"] == 200


def test_padding_up_to_the_next_bucket():
    buckets = batch_buckets(64)
    assert buckets == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert batch_buckets(100)[-2:] == (96, 100) and batch_buckets(1) == (1,)
    assert [bucket_for(bs, buckets) for bs in (1, 3, 4, 5, 9, 17, 25, 33, 63, 64)] == [1, 4, 4, 8, 16, 24, 32, 48,
                                                                                        64, 64]
    with pytest.raises(ValueError):
        bucket_for(65, buckets)
    with pytest.raises(ValueError):
        bucket_for(0, buckets)
    x = torch.arange(6.0).view(3, 2)
    padded = pad_rows(x, 4, fill=-1)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], x) and torch.equal(padded[3], torch.tensor([-1.0, -1]))
    assert pad_rows(x, 3) is x
    with pytest.raises(ValueError):
        pad_rows(x, 2)

    dev = FakeCapturer()
    pool = GraphPool(dev, 10**9, buckets)
    pool.plan([], build)
    key = GraphKey("decode", pool.bucket_for(3), 1)
    out = pool.run(key, double, (pad_rows(x, key.bucket),))
    assert key.bucket == 4 and dev.replays[key] == 1 and torch.equal(out[:3], x * 2)


def test_eager_when_a_graph_does_not_fit():
    dev = FakeCapturer(size=lambda key: (500, 1000))
    pool = GraphPool(dev, 1000, (8,))
    pool.plan([(8, A)])
    key = GraphKey("verify", 8, 4)
    for _ in range(3):
        assert torch.equal(pool.run(key, double, X), X[0] * 2)
    assert not pool.held and not dev.captured and pool.bytes == 0
    assert pool.counts["eager_runs"] == 3 and dev.warmups[key] == 1  # measured once, then known too big


def test_a_capture_that_overshoots_is_released_and_not_retried():
    dev = FakeCapturer(size=lambda key: (100, 0), extra=lambda key: (150, 0) if key.phase == "verify" else (0, 0))
    pool = GraphPool(dev, 300, (8,))
    pool.plan([(8, A)])
    pool.run(GraphKey("decode", 8, 1), double, X)
    for _ in range(5):
        pool.run(GraphKey("verify", 8, 4), double, X)
        assert dev.device_bytes <= 300
    assert set(pool.held) == {GraphKey("decode", 8, 1)} and dev.captured.count(GraphKey("verify", 8, 4)) == 1


def test_workspace_growth_past_the_budget_releases_everything():
    dev = FakeCapturer(size=lambda key: (100, 100), extra=lambda key: (0, 10**6) if key.phase == "verify" else (0, 0))
    pool = GraphPool(dev, 1000, (8,))
    pool.plan([(8, A)], build)
    assert not pool.held and dev.device_bytes == 0 == pool.bytes
    assert dev.captured[0] == GraphKey("decode", 8, 1)  # held until the verify capture blew the workspace


def test_replan_releases_graphs_outside_the_new_plan():
    dev = FakeCapturer()
    pool = GraphPool(dev, 10**9, (1, 8))
    pool.plan([(8, A)], build)
    held_a = dev.allocated
    pool.plan([(8, C)], build)
    # A and C share catch-up and draft; only A's verify goes, and C's comes.
    assert GraphKey("verify", 8, 4) not in pool.held and GraphKey("verify", 8, 6) in pool.held
    assert pool.counts["evictions"] == 1
    assert dev.allocated == held_a - default_size(GraphKey("verify", 8, 4))[0] + default_size(
        GraphKey("verify", 8, 6))[0]


def test_eager_capturer_runs_fn_through_the_same_interface():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    pool = GraphPool(EagerCapturer(), 10**9, batch_buckets(8))
    pool.plan([(8, A)], build=lambda key: (mlp, (torch.randn(key.bucket, 16),)))
    with torch.no_grad():
        for key in (GraphKey("decode", 8, 1), GraphKey("verify", 8, 4), GraphKey("verify", 2, 7)):
            x = torch.randn(key.bucket, 16)
            assert torch.equal(pool.run(key, mlp, (x,)), mlp(x))
    s = pool.stats()
    assert s["graphs"] == 0 and s["bytes"] == 0 and s["captures"] == 0 and s["eager_runs"] == 3
