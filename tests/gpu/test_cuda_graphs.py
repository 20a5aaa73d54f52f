"""Real CUDA graph capture and replay through the pool: outputs equal eager, the byte budget holds in torch's
allocator figures, all graphs share one memory pool. Skipped without CUDA."""

from __future__ import annotations

import random

import pytest
import torch

from tlt.engine.cuda_graphs import CudaGraphCapturer, GraphKey, GraphPool, batch_buckets, keys_for_arm, pad_rows
from tlt.engine.models.decoder import AttentionBatch, DecoderLM
from tlt.engine.models.model_config import ModelConfig
from tlt.engine.spec.worker import SpecConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = ModelConfig(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                  max_position_embeddings=256, tie_word_embeddings=False, attention_bias=False, qk_norm=False)
KV_LEN = 128
ROWS = 16
ARMS = [SpecConfig(3, 1, 4), SpecConfig(2, 2, 4), SpecConfig(4, 2, 8)]


class Step:
    """A tiny decoder's forward at a fixed attention length (static shapes), with its own KV cache:
    ids, pos [B, T] -> float32 logits [B, T, V]. Writing K/V at the given positions makes it idempotent."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.model = DecoderLM(CFG, KV_LEN).cuda()
        with torch.no_grad():
            for p in self.model.parameters():
                p.normal_(0.0, 0.2)
        self.model.build_rope()
        shape = (ROWS, CFG.num_kv_heads, KV_LEN, CFG.head_dim)
        self.k = [torch.randn(shape, device="cuda") for _ in range(CFG.num_layers)]
        self.v = [torch.randn(shape, device="cuda") for _ in range(CFG.num_layers)]

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        key = torch.arange(KV_LEN, device=ids.device)
        mask = key.view(1, 1, 1, -1) <= pos.view(B, 1, T, 1)
        rows = torch.arange(B, device=ids.device).view(B, 1).expand(B, T)
        hidden, _ = self.model(ids, AttentionBatch(0, pos, mask, KV_LEN, rows), self.k, self.v)
        return self.model.logits(hidden)


def tokens(key: GraphKey) -> int:
    return key.shape if isinstance(key.shape, int) else key.shape[0] * key.shape[1]


def inputs_for(key: GraphKey, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    T = tokens(key)
    ids = torch.randint(0, CFG.vocab_size, (key.bucket, T), generator=gen)
    start = torch.randint(0, KV_LEN - T, (key.bucket, 1), generator=gen)
    return ids.cuda(), (start + torch.arange(T)).cuda()


def pool_segment_bytes(capturer: CudaGraphCapturer) -> int:
    """The shared pool's reserved bytes, straight from the allocator's snapshot."""
    pool = tuple(capturer.pool)
    return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) == pool)


@torch.inference_mode()
def test_replay_equals_eager_and_all_graphs_share_one_pool():
    step = Step()
    gen = torch.Generator().manual_seed(0)
    capturer = CudaGraphCapturer()
    buckets = (1, 4, 8)
    pool = GraphPool(capturer, 1 << 40, buckets)
    pool.plan([(8, arm) for arm in ARMS], build=lambda key: (step, inputs_for(key, gen)))
    assert set(pool.held) == {GraphKey("decode", b, 1) for b in buckets} | {
        k for arm in ARMS for k in keys_for_arm(arm, 8)}
    assert {g.graph.pool() for g in pool.held.values()} == {tuple(capturer.pool)}
    for key in pool.held:
        for _ in range(2):  # new inputs each time: the replay reads the copied inputs, not the captured ones
            x = inputs_for(key, gen)
            hits = pool.counts["hits"]
            out = pool.run(key, step, x).clone()
            assert pool.counts["hits"] == hits + 1
            torch.testing.assert_close(out, step(*x))  # same kernels: equal up to float32 rounding
    # A batch of 3 padded to bucket 4: its rows agree with the unpadded eager run.
    key = GraphKey("decode", pool.bucket_for(3), 1)
    ids, pos = inputs_for(GraphKey("decode", 3, 1), gen)
    out = pool.run(key, step, (pad_rows(ids, key.bucket), pad_rows(pos, key.bucket)))
    torch.testing.assert_close(out[:3], step(ids, pos), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        pool.run(key, step, (ids, pos))


@torch.inference_mode()
def test_budget_holds_in_the_allocator_figures():
    step = Step(seed=1)
    gen = torch.Generator().manual_seed(1)
    buckets = batch_buckets(16)
    build = lambda key: (step, inputs_for(key, gen))

    # What everything would take, measured; the bounded pool gets the same workspace and a third of the
    # graphs' own buffers (a tiny model's workspace is mostly the allocator's 2 MiB segment rounding).
    everything = GraphPool(CudaGraphCapturer(), 1 << 40, buckets)
    everything.plan([(b, arm) for b in buckets for arm in ARMS], build)
    workspace = everything.capturer.workspace_bytes()
    budget = workspace + (everything.bytes - workspace) // 3
    del everything
    torch.cuda.empty_cache()

    capturer = CudaGraphCapturer()
    pool = GraphPool(capturer, budget, buckets, half_life=16)
    pool.plan([(b, arm) for b in buckets for arm in ARMS], build)
    rng = random.Random(0)
    for i in range(300):
        arm = rng.choice([None, *ARMS])
        for key in keys_for_arm(arm, rng.choice(buckets)):
            x = inputs_for(key, gen)
            out = pool.run(key, step, x)
            if i % 25 == 0:
                torch.testing.assert_close(out, step(*x))
            assert pool.bytes <= budget
            assert capturer.workspace_bytes() == pool_segment_bytes(capturer)
    assert pool.counts["captures"] > len(buckets) and pool.counts["evictions"] > 0, pool.stats()
    assert all(GraphKey("decode", b, 1) in pool.held for b in buckets)
    del out, x  # `out` may be a graph's static output, which would stay allocated

    # Releasing graphs gives back exactly their static bytes, as the allocator counts them.
    spec = [k for k in pool.held if k.phase != "decode"]
    assert spec
    released = sum(pool.held[k].static_bytes for k in spec)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    pool.plan([])
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated() == released
    assert set(pool.held) == {GraphKey("decode", b, 1) for b in buckets}
