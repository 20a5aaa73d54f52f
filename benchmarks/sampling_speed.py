"""Truncated sampling at batch: tlt's top-candidate kept sets vs a full-vocabulary sort, side by side.

    python -m benchmarks.sampling_speed --json benchmarks/results/sampling_speed.json

One engine (SmolLM2-135M, bfloat16), the same 128 distinct chat prompts x 64 new tokens (ignore_eos),
T=1 with top-p 0.95 and a per-prompt `sampling_seed`, generated once with each kept-set rule, alternating
`--repeats` times in this one process. The two rules keep the same tokens (tests/engine/test_sampling.py),
so with seeds the outputs must be identical: the run checks it. Greedy decoding of the same work is timed
beside them as the floor that sampling adds to.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import chat_prompts, machine, write_json


def run(args) -> dict:
    import torch

    import tlt
    from tlt.engine import sampling

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = tlt.Engine(dtype="bfloat16")
    prompts = chat_prompts(engine.tokenizer, args.prompts)
    sampled = [{"temperature": 1.0, "top_p": args.top_p, "max_new_tokens": args.new_tokens, "ignore_eos": True,
                "sampling_seed": 1000 + i} for i in range(len(prompts))]
    greedy = {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
    engine.generate(input_ids=prompts[:8], sampling_params=sampled[:8])  # warm-up (and KV allocation)
    candidates = sampling._TOP_CANDIDATES
    times: dict[str, list[float]] = {"top_candidates": [], "full_sort": [], "greedy": []}
    outputs = {}
    tokens = len(prompts) * args.new_tokens
    try:
        for rep in range(args.repeats):
            for mode in times:
                # A candidate count above the vocabulary makes kept_set sort the whole vocabulary (the old rule).
                sampling._TOP_CANDIDATES = candidates if mode == "top_candidates" else 1 << 30
                t0 = time.perf_counter()
                outs = engine.generate(input_ids=prompts, sampling_params=greedy if mode == "greedy" else sampled)
                times[mode].append(time.perf_counter() - t0)
                outputs[mode] = [o["output_ids"] for o in outs]
                print(f"  repeat {rep + 1}/{args.repeats} {mode}: {tokens / times[mode][-1]:.0f} tok/s", flush=True)
    finally:
        sampling._TOP_CANDIDATES = candidates
        engine.shutdown()
    best = {m: min(t) for m, t in times.items()}
    return {
        "machine": machine(),
        "config": {"prompts": len(prompts), "new_tokens": args.new_tokens, "top_p": args.top_p,
                   "repeats": args.repeats, "candidates": candidates, "dtype": "bfloat16"},
        "seconds": times,
        "tok_s": {m: tokens / b for m, b in best.items()},
        "speedup_vs_full_sort": best["full_sort"] / best["top_candidates"],
        "identical_outputs": outputs["top_candidates"] == outputs["full_sort"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="benchmarks/results/sampling_speed.json")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    args = p.parse_args(argv)
    res = run(args)
    write_json(args.json, res)


if __name__ == "__main__":
    main()
