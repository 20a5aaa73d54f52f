"""A long-tail rollout: no speculation vs each static arm vs the adaptive selector, same seeds.

    python -m benchmarks.adaptive_rollout --json benchmarks/results/adaptive_rollout.json
    tlt bench adaptive --json benchmarks/results/adaptive_rollout.json [--drafter DIR]

The workload is an RL rollout step: `--prompts` prompts (`--task`, see `common.task_prompts`) x `--n` samples at
temperature `--temperature`, every sample its own `sampling_seed`, all submitted at once. Each sample's
`max_new_tokens` is drawn from a Pareto distribution (`--min-tokens`, `--alpha`, capped at `--max-tokens`)
by a fixed seed: most answers are short, a few are long, and the batch shrinks from hundreds of sequences to
a tail of a few — where the hardware idles. By default every sample runs to its drawn length (ignore_eos,
`--natural-lengths` lets EOS end it): in bfloat16, speculative and plain rounds round the logits differently,
a T=1 draw that is nearly tied then flips and the rest of that sample differs (measured: one speculative
round at batch 256 changed 54% of the samples), so with natural lengths each run does different work and
the tail — set by whichever sample ends last — differs by chance. Fixed lengths make every run's work equal.

One engine (one model load, one drafter) serves every run: `set_speculation` fixes the arm for the static
runs ('off' and each of `--arms`); the adaptive run lets the bandit choose among the same arms and plain
decoding, starting cold (reset before the run; fixed-arm rounds do not feed it), after one discarded warm-up
rollout. 'off' and 'adaptive' run twice, interleaved, and each is reported at its faster run (both repeats
are in the JSON): the comparison the headline rests on then does not depend on run order. Reported per
run: total time, time in the tail phase (from the first round with <= `--tail` active sequences to the end),
tokens, the arm mix, and whether the outputs are token-identical to the no-speculation run (seeded sampling:
they should be, up to bfloat16 near-ties). Headline keys: `speedup_total` and `speedup_tail` (adaptive vs no
speculation) and `vs_best_static` (adaptive throughput / the best static arm's, chosen in hindsight); beside them
`oracle_total` and `oracle_tail`: the speedup over no speculation of a selector that knew, for every batch size, the
fastest of the static runs there (goodput from their timelines) and paid nothing to learn it, i.e. what the
static arms allow any selector on this machine and drafter (`oracle_bound`). A PNG
timeline (active sequences over time for every run; the adaptive run's arm per round) is written beside the
JSON.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.common import machine, task_prompts, write_json

DEFAULT_ARMS = "s2k1n3,s3k1n4,s4k2n8"


def heavy_tail_lengths(count: int, lo: int, alpha: float, hi: int, seed: int) -> list[int]:
    """Pareto(alpha) lengths >= lo, capped at hi, from a fixed seed."""
    import random

    rng = random.Random(seed)
    return [min(int(lo * (1.0 - rng.random()) ** (-1.0 / alpha)), hi) for _ in range(count)]


def _requests(prompts, n: int, temperature: float, lengths: list[int], seed: int, ignore_eos: bool = True):
    ids, sps = [], []
    for i, p in enumerate(prompts):
        for j in range(n):
            k = i * n + j
            ids.append(p)
            sps.append({"temperature": temperature, "max_new_tokens": lengths[k], "sampling_seed": seed + k,
                        "ignore_eos": ignore_eos})
    return ids, sps


def _run(engine, mode: str, ids, sps, tail: int, log) -> dict:
    engine.set_speculation(mode)
    engine.get_round_log(clear=True)
    t0 = time.perf_counter()
    done = [0]

    def progress(_):  # a line every 32 finished samples
        done[0] += 1
        if done[0] % 32 == 0 or done[0] == len(ids):
            log(f"    {mode}: {done[0]}/{len(ids)} samples done, {time.perf_counter() - t0:.1f} s")

    outs = _generate_with_callback(engine, ids, sps, progress)
    total = time.perf_counter() - t0
    rounds = engine.get_round_log(clear=True)
    start = rounds[0]["t"] if rounds else 0.0
    tail_start = next((r["t"] for r in rounds if r["batch_size"] <= tail), None)
    end = rounds[-1]["t"] + rounds[-1]["seconds"] if rounds else 0.0
    mix: dict[str, int] = {}
    for r in rounds:
        mix[r["arm"]] = mix.get(r["arm"], 0) + 1
    tokens = sum(len(o["output_ids"]) for o in outs)
    return {"mode": mode, "total_s": total, "tail_s": (end - tail_start) if tail_start is not None else 0.0,
            "tokens": tokens, "tok_per_s": tokens / total, "rounds": len(rounds), "arm_rounds": mix,
            "accept_len": _accept_len(outs),
            "timeline": [[round(r["t"] - start, 4), r["arm"], r["batch_size"], r["tokens"], round(r["seconds"], 5)]
                         for r in rounds],
            "outputs": [o["output_ids"] for o in outs]}


def _generate_with_callback(engine, ids, sps, on_finish):
    """engine.generate, calling on_finish as each sample finishes (for a progress line)."""
    import asyncio

    async def go():
        async def one(i, sp):
            out = await engine.async_generate(input_ids=i, sampling_params=sp)
            on_finish(out)
            return out

        return await asyncio.gather(*(one(i, sp) for i, sp in zip(ids, sps)))

    return asyncio.run(go())


def oracle_bound(runs: list[dict], tail: int) -> dict:
    """Speedup over the 'off' run of an oracle that runs, at every batch size, whichever static run ('off' or a fixed
    arm) had the highest goodput there (tokens / seconds of its rounds at that batch size, from the timelines, whose
    entries are [t, arm, batch size, tokens, round seconds]): each of the off run's rounds shrinks by that ratio, the
    time outside rounds (prefill) stays. {"total", "tail"} (tail: rounds with <= `tail` sequences; None if none)."""
    goodput: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["mode"] == "adaptive":
            continue
        acc: dict[int, list[float]] = {}
        for _, _, bs, tok, sec in r["timeline"]:
            a = acc.setdefault(bs, [0.0, 0.0])
            a[0] += tok
            a[1] += sec
        for bs, (tok, sec) in acc.items():
            if sec > 0:
                goodput.setdefault(bs, {})[r["mode"]] = tok / sec
    off = next(r for r in runs if r["mode"] == "off")
    saved = {"total": 0.0, "tail": 0.0}
    for _, _, bs, _, sec in off["timeline"]:
        g = goodput.get(bs, {})
        cut = sec * (1 - g["off"] / max(g.values())) if g.get("off") else 0.0
        saved["total"] += cut
        if bs <= tail:
            saved["tail"] += cut
    base = {"total": off["total_s"], "tail": off["tail_s"]}
    return {k: (base[k] / (base[k] - saved[k]) if base[k] > saved[k] else None) for k in base}


def _accept_len(outs) -> float | None:
    ver = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
    acc = sum(o["meta_info"].get("spec_accept_token_num", 0) for o in outs)
    return 1 + acc / ver if ver else None


def bench(model_path, drafter: str, arms: list[str], kind: str, prompts: int, n: int, temperature: float,
          min_tokens: int, alpha: float, max_tokens: int, tail: int, dtype: str, seed: int, epsilon: float, policy: str,
          threads: int | None, log=print, ignore_eos: bool = True, deterministic: bool = False) -> dict:
    import torch

    import tlt

    if threads:
        torch.set_num_threads(threads)
    engine = tlt.Engine(model_path, dtype=dtype, random_seed=seed, speculative_draft_model_path=drafter,
                        speculative_adaptive=True, speculative_arms=arms, speculative_epsilon=epsilon,
                        speculative_selector=policy, max_running_requests=max(prompts * n, 1),
                        enable_deterministic_inference=deterministic)
    ps = task_prompts(engine.tokenizer, kind, prompts, 10_000 + seed)  # arithmetic: a seed no training set used
    lengths = heavy_tail_lengths(prompts * n, min_tokens, alpha, max_tokens, seed)
    ids, sps = _requests(ps, n, temperature, lengths, seed, ignore_eos)
    log(f"workload: {prompts} {kind} prompts x n={n}, T={temperature}, max_new_tokens Pareto(alpha={alpha}) "
        f"from {min_tokens}, cap {max_tokens}: mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}"
        f"{', ignore_eos' if ignore_eos else ', EOS ends samples'}")
    # Warm-up: one whole plain rollout, discarded. The first run otherwise pays one-time costs the others
    # do not (KV growth to its full size, first touch of GBs of pages: measured ~20% of a run). Plain
    # rounds do not teach the bandit anything (fixed-arm rounds never feed it).
    engine.set_speculation("off")
    log("  warm-up run (off, discarded)")
    _run(engine, "off", ids, sps, tail, lambda m: None)
    # off and adaptive twice, interleaved, each reported at its faster run: both then see the same drift of
    # a shared machine (measured: the first run after the warm-up ran ~4% slower than the same run later).
    # The bandit is reset before each adaptive run: it starts cold every time.
    runs, repeats = [], {}
    for mode in ["off", "adaptive", "off", "adaptive", *arms]:
        if mode == "adaptive":
            engine.reset_selector()
        log(f"  run {mode}")
        r = _run(engine, mode, ids, sps, tail, log)
        log(f"  {mode}: {r['total_s']:.1f} s total, tail {r['tail_s']:.1f} s, {r['tok_per_s']:.1f} tok/s, "
            f"arms {r['arm_rounds']}")
        repeats.setdefault(mode, []).append(round(r["total_s"], 2))
        prev = next((i for i, x in enumerate(runs) if x["mode"] == mode), None)
        if prev is None:
            runs.append(r)
        elif r["total_s"] < runs[prev]["total_s"]:
            runs[prev] = r
    for r in runs:
        r["repeats_total_s"] = repeats[r["mode"]]
    engine.shutdown()
    by = {r["mode"]: r for r in runs}
    ref = by["off"]["outputs"]
    for r in runs:
        r["identical_to_off"] = sum(a == b for a, b in zip(r["outputs"], ref)) / len(ref)
    statics = [by[a] for a in arms]
    best = max(statics, key=lambda r: r["tok_per_s"])
    ad, off = by["adaptive"], by["off"]
    res = {
        "benchmark": "adaptive_rollout", "machine": machine(), "dtype": dtype, "drafter": drafter,
        "workload": {"kind": kind, "prompts": prompts, "n": n, "temperature": temperature, "min_tokens": min_tokens,
                     "alpha": alpha, "max_tokens": max_tokens, "tail_threshold": tail, "seed": seed,
                     "policy": policy, "epsilon": epsilon, "arms": arms, "ignore_eos": ignore_eos,
                     "enable_deterministic_inference": deterministic},
        "speedup_total": off["total_s"] / ad["total_s"],
        "speedup_tail": off["tail_s"] / ad["tail_s"] if ad["tail_s"] else None,
        "vs_best_static": ad["tok_per_s"] / best["tok_per_s"],
        "best_static": best["mode"],
        **{f"oracle_{k}": v for k, v in oracle_bound(runs, tail).items()},
        "runs": [{k: v for k, v in r.items() if k != "outputs"} for r in runs],
    }
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 1.4])
    for r in res["runs"]:
        t = [x[0] for x in r["timeline"]]
        b = [x[2] for x in r["timeline"]]
        ax1.step(t, b, where="post", label=f"{r['mode']} ({r['total_s']:.0f} s)",
                 linewidth=2.2 if r["mode"] == "adaptive" else 1.0)
    ax1.set_ylabel("active sequences")
    ax1.set_yscale("log")
    ax1.axhline(res["workload"]["tail_threshold"], color="grey", linestyle=":", linewidth=0.8)
    ax1.legend(fontsize=8)
    ax1.set_title(f"Long-tail rollout: adaptive {res['speedup_total']:.2f}x total, "
                  f"{res['speedup_tail'] or 0:.2f}x tail vs no speculation")
    ad = next(r for r in res["runs"] if r["mode"] == "adaptive")
    names = ["off", *res["workload"]["arms"]]
    ax2.scatter([x[0] for x in ad["timeline"]], [names.index(x[1]) for x in ad["timeline"]], s=4)
    ax2.set_yticks(range(len(names)), names)
    ax2.set_ylabel("adaptive: arm")
    ax2.set_xlabel("seconds since the rollout started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write the results here (and a PNG timeline beside it)")
    p.add_argument("--model-path", default=None)
    p.add_argument("--drafter", default="benchmarks/drafters/smollm2", help="drafter folder (tlt train-drafter)")
    p.add_argument("--arms", default=DEFAULT_ARMS, help="comma-separated static arms, e.g. s3k1n4,s4k2n8")
    p.add_argument("--task", default="arithmetic", choices=["arithmetic", "chat"], help="see common.task_prompts")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--min-tokens", type=int, default=24)
    p.add_argument("--alpha", type=float, default=1.1, help="Pareto tail index (smaller: heavier tail)")
    p.add_argument("--max-tokens", type=int, default=768)
    p.add_argument("--tail", type=int, default=8, help="tail phase: at most this many active sequences")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--policy", default="epsilon_greedy", choices=["epsilon_greedy", "ucb"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    p.add_argument("--natural-lengths", action="store_true",
                   help="let EOS end samples (default: each runs to its drawn length; see the module docstring)")
    p.add_argument("--deterministic", action="store_true",
                   help="enable_deterministic_inference: every run emits the same tokens (bf16 too), so natural "
                        "lengths compare like with like")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tlt bench adaptive", description=__doc__.split("\n")[0])
    add_args(p)
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.drafter, "config.json")):
        raise SystemExit(f"no drafter at {args.drafter}: train one with `tlt train-drafter --out {args.drafter}`")
    t = time.perf_counter()
    res = bench(args.model_path, args.drafter, [a.strip() for a in args.arms.split(",") if a.strip()],
                args.task, args.prompts, args.n, args.temperature, args.min_tokens, args.alpha, args.max_tokens,
                args.tail, args.dtype, args.seed, args.epsilon, args.policy, args.threads,
                log=lambda m: print(m, flush=True), ignore_eos=not args.natural_lengths,
                deterministic=args.deterministic)
    res["bench_s"] = time.perf_counter() - t
    if args.json:
        res["plot"] = os.path.splitext(args.json)[0] + ".png"
        plot(res, res["plot"])
    summary = {k: v for k, v in res.items() if k != "runs"}
    summary["runs"] = [{k: v for k, v in r.items() if k != "timeline"} for r in res["runs"]]
    write_json(None, summary)
    if args.json:
        write_json_quiet(args.json, res)


def write_json_quiet(path: str, data: dict) -> None:
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
        f.write("\n")


if __name__ == "__main__":
    main()
