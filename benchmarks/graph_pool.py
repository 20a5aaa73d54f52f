"""CUDA graph pool: replay vs eager speed of decoder steps, and pool bytes vs capturing every (bucket, arm) pair.

    python -m benchmarks.graph_pool --json benchmarks/results/graph_pool.json
    benchmarks/gpu_suite.sh          # the CUDA tests, then this; JSON under $OUT

Needs CUDA (exits with a message elsewhere). A random-weight target with Llama-3.2-1B's shapes (16 layers,
hidden 2048, 32/8 heads, MLP 8192, vocab 128256; bfloat16) and a one-layer drafter of the same width; the
attention length is fixed (`--kv-len`) so that every step has static shapes. Each phase's step:
    decode    target over 1 token per row            -> float32 logits [B, 1, V]
    verify    target over N draft tokens per row       -> logits [B, N, V]
    catch_up  drafter over num_steps + 1 tokens per row -> logits [B, steps + 1, V]
    draft     num_steps - 1 drafter passes over topk tokens per row, each feeding its top-k back
Speed: milliseconds per step, eager vs replay through the pool (input copies included), median of
`--iters` runs timed by CUDA events, decode and verify at `--batch-sizes`.
Memory: the arms of `--arms` at the buckets of `batch_buckets(--max-bs)`.
    everything  one pool, no budget, every (bucket, arm) pair captured up front: measured bytes, graphs
    bounded     budget = `--budget-frac` x everything's bytes; the pairs a long-tail selector may choose
                (speculation at buckets <= `--spec-max-bs`, plain decode everywhere), captured up front,
                then `--steps` steps of a random long-tail workload (the batch shrinks, the arm varies);
                the pool's bytes are checked against the budget after every step
Bytes are the pool's measured figures (capture.py): the shared workspace (the pool's segments in
`torch.cuda.memory_snapshot()`) plus the graphs' static buffers (`torch.cuda.memory_allocated()` deltas).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.common import machine, write_json
from tlt.engine.cuda_graphs import CudaGraphCapturer, GraphKey, GraphPool, batch_buckets, bucket_for, keys_for_arm
from tlt.engine.models.decoder import AttentionBatch, DecoderLM
from tlt.engine.models.model_config import ModelConfig
from tlt.engine.spec.worker import SpecConfig

LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling=None, max_position_embeddings=131072, tie_word_embeddings=True,
                attention_bias=False, qk_norm=False)


class StaticDecoder:
    """A decoder with its own KV cache, run at a fixed attention length: every step has static shapes."""

    def __init__(self, cfg: ModelConfig, rows: int, kv_len: int, device, dtype: torch.dtype):
        self.model = DecoderLM(cfg, kv_len).to(device=device, dtype=dtype)
        with torch.no_grad():
            for p in self.model.parameters():  # matrices ~ N(0, 0.02) as HF initialises; norms at 1
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
        self.model.build_rope()
        shape = (rows, cfg.num_kv_heads, kv_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.kv_len = kv_len

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids, pos [B, T] -> float32 logits [B, T, V]; token t of row b writes K/V at pos[b, t] of row b and
        attends to the row's slots <= its position (a chain; tree masks cost the same)."""
        B, T = ids.shape
        key = torch.arange(self.kv_len, device=ids.device)
        mask = key.view(1, 1, 1, -1) <= pos.view(B, 1, T, 1)  # [B, 1, T, kv_len]
        rows = torch.arange(B, device=ids.device).view(B, 1).expand(B, T)
        hidden, _ = self.model(ids, AttentionBatch(0, pos, mask, self.kv_len, rows), self.k, self.v)
        return self.model.logits(hidden)


def phase_step(target: StaticDecoder, drafter: StaticDecoder, key: GraphKey) -> tuple[Callable, int]:
    """The step a key stands for and its tokens per row."""
    if key.phase in ("decode", "verify"):
        return target, key.shape
    if key.phase == "catch_up":
        return drafter, key.shape
    steps, topk = key.shape

    def draft(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for _ in range(steps - 1):  # [B, topk] tokens -> their best continuations, one position deeper
            ids = drafter(ids, pos)[:, 0].topk(topk, dim=-1).indices
            pos = pos + 1
        return ids

    return draft, topk


def example_inputs(key: GraphKey, tokens: int, kv_len: int, device, gen: torch.Generator,
                   vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and positions [bucket, tokens], the positions leaving room for the step's writes."""
    ids = torch.randint(0, vocab, (key.bucket, tokens), generator=gen).to(device)
    start = torch.randint(0, kv_len // 2, (key.bucket, 1), generator=gen)
    return ids, (start + torch.arange(tokens)).to(device)


def cuda_ms(fn: Callable, iters: int) -> float:
    """Median milliseconds of fn() over `iters` runs, each timed by CUDA events."""
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def speed(target: StaticDecoder, args, gen: torch.Generator) -> list[dict]:
    """Eager vs replay milliseconds per step for decode and verify at each batch size."""
    rows = []
    pool = GraphPool(CudaGraphCapturer(), 1 << 50, tuple(args.batch_sizes))
    pool.plan([(b, SpecConfig(1, 1, args.verify_tokens)) for b in args.batch_sizes])
    for bs in args.batch_sizes:
        for key in (GraphKey("decode", bs, 1), GraphKey("verify", bs, args.verify_tokens)):
            inputs = example_inputs(key, key.shape, args.kv_len, "cuda", gen, target.model.cfg.vocab_size)
            pool.run(key, target, inputs)  # warm-up and capture
            eager = cuda_ms(lambda x=inputs: target(*x), args.iters)
            replay = cuda_ms(lambda k=key, x=inputs: pool.run(k, target, x), args.iters)
            # Same kernels on the same inputs: expected 0; reported rather than asserted (tests/gpu asserts).
            diff = (pool.run(key, target, inputs) - target(*inputs)).abs().max().item()
            rows.append({"phase": key.phase, "batch": bs, "tokens_per_row": key.shape, "eager_ms": eager,
                         "replay_ms": replay, "speedup": eager / replay, "max_abs_diff": diff})
            print(rows[-1], flush=True)
    return rows


def capture_pool(target: StaticDecoder, drafter: StaticDecoder, buckets: tuple[int, ...], budget: int,
                 allowed: list[tuple[int, SpecConfig | None]], args, gen: torch.Generator) -> tuple[GraphPool, float]:
    """A pool on a fresh capturer with `allowed` planned and captured up front; and the capture seconds."""
    vocab = target.model.cfg.vocab_size

    def build(key: GraphKey):
        fn, tokens = phase_step(target, drafter, key)
        return fn, example_inputs(key, tokens, args.kv_len, "cuda", gen, vocab)

    pool = GraphPool(CudaGraphCapturer(), budget, buckets)
    t = time.perf_counter()
    pool.plan(allowed, build)
    torch.cuda.synchronize()
    return pool, time.perf_counter() - t


def memory(target: StaticDecoder, drafter: StaticDecoder, args, gen: torch.Generator) -> dict:
    buckets = batch_buckets(args.max_bs)
    arms = args.arms
    everything, secs = capture_pool(target, drafter, buckets, 1 << 50,
                                    [(b, a) for b in buckets for a in arms], args, gen)
    all_stats = {**everything.stats(), "capture_s": secs, **everything.footprint(arms)}
    print("everything", all_stats, flush=True)
    del everything
    gc.collect()
    torch.cuda.empty_cache()

    budget = int(args.budget_frac * all_stats["bytes"])
    allowed = [(b, a) for b in buckets if b <= args.spec_max_bs for a in arms]
    pool, secs = capture_pool(target, drafter, buckets, budget, allowed, args, gen)
    planned_stats = {**pool.stats(), "capture_s": secs}
    print("bounded, planned", planned_stats, flush=True)

    # A long-tail workload: the running batch shrinks from max_bs to 1; the selector speculates only at
    # small batches and picks an arm at random there.
    rng = random.Random(args.seed)
    vocab = target.model.cfg.vocab_size
    max_bytes, over = 0, 0
    for step in range(args.steps):
        bs = max(1, round(args.max_bs * (1 - step / args.steps) ** 3))
        bucket = bucket_for(bs, buckets)
        arm = rng.choice(arms) if bucket <= args.spec_max_bs and rng.random() < 0.8 else None
        for key in keys_for_arm(arm, bucket):
            fn, tokens = phase_step(target, drafter, key)
            pool.run(key, fn, example_inputs(key, tokens, args.kv_len, "cuda", gen, vocab))
            max_bytes = max(max_bytes, pool.bytes)
            over += pool.bytes > budget
    run_stats = {**pool.stats(), "max_bytes_seen": max_bytes, "steps_over_budget": over,
                 **pool.footprint(arms)}
    print("bounded, after the workload", run_stats, flush=True)
    return {"buckets": list(buckets), "arms": [dataclasses.asdict(a) for a in arms], "spec_max_bs": args.spec_max_bs,
            "budget_frac": args.budget_frac, "everything": all_stats, "bounded_planned": planned_stats,
            "bounded_after_workload": run_stats}


def parse_arm(text: str) -> SpecConfig:
    """'STEPS,TOPK,NUM_DRAFT_TOKENS' -> SpecConfig."""
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"arm {text!r}: want STEPS,TOPK,NUM_DRAFT_TOKENS")
    return SpecConfig(*parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_json = os.path.join(os.environ.get("OUT") or "benchmarks/results", "graph_pool.json")
    p.add_argument("--json", default=default_json, help="default: $OUT/graph_pool.json ($OUT: benchmarks/results)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-len", type=int, default=1024)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--verify-tokens", type=int, default=8)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--arms", type=parse_arm, nargs="+", default=[parse_arm(a) for a in
                                                                 ("3,1,4", "5,1,6", "4,2,8", "6,4,8")])
    p.add_argument("--max-bs", type=int, default=64)
    p.add_argument("--spec-max-bs", type=int, default=16, help="largest bucket the selector speculates at")
    p.add_argument("--budget-frac", type=float, default=0.1, help="bounded pool budget, a fraction of everything")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/graph_pool.py needs CUDA (graph capture and replay); this machine has none")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(**LLAMA_1B)
    rows = max(args.max_bs, *args.batch_sizes)
    target = StaticDecoder(cfg, rows, args.kv_len, "cuda", dtype)
    drafter = StaticDecoder(ModelConfig(**dict(LLAMA_1B, num_layers=1)), rows, args.kv_len, "cuda", dtype)
    with torch.inference_mode():
        result = {"machine": machine(), "model": dict(LLAMA_1B, dtype=args.dtype, kv_len=args.kv_len),
                  "speed": speed(target, args, gen), "memory": memory(target, drafter, args, gen)}
    write_json(args.json, result)


if __name__ == "__main__":
    main()
