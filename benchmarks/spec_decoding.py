"""Speculative decoding: tokens/s with and without EAGLE speculation, greedy and T=1, by batch size.

    python -m benchmarks.spec_decoding --json benchmarks/results/spec_decoding.json \\
        --drafter benchmarks/drafters/smollm2
    tlt bench spec --json benchmarks/results/spec_decoding.json --drafter benchmarks/drafters/smollm2

SmolLM2-135M (bfloat16 by default), one engine without speculation and one per speculative config
(`--configs`, each STEPS,TOPK[,NUM_DRAFT_TOKENS]; default chain of 3, chain of 5, trees of depth 4 with topk 2
and 8 nodes and with topk 4 and 16 nodes), all loaded in this one process and reused across batch sizes. At
each batch size B, max(B, --min-prompts) prompts of the workload (`--workload`: chat
  questions, or the GRPO demo's arithmetic word problems) run in batches of B, `--new-tokens` tokens each
(ignore_eos); the same prompts for every config. Greedy, and T=1 with a per-prompt `sampling_seed` (seed +
prompt index), so that every config samples the same way. Runs are interleaved (batch size, then mode, then
config) so that machine noise hits all configs alike. One torch thread by default (`--threads`): on a shared
2-core machine two threads stall each other whenever another process holds a core.

Reported per (mode, batch size, config): tokens/s, speedup over no speculation, the mean accept length
(accepted draft tokens per verify round + 1, from the engine's counters), and the fraction of sequences
token-identical to the run without speculation (bfloat16 may diverge after a near-tie: reported, never
an error). A PNG plot of speedup vs batch size is written beside the JSON.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import ARITHMETIC_SEED, machine, task_prompts, write_json

DEFAULT_CONFIGS = ["3,1", "5,1", "4,2,8", "4,4,16"]
MODES = {"greedy": {"temperature": 0.0}, "T=1": {"temperature": 1.0}}


def parse_config(text: str) -> dict:
    """'STEPS,TOPK[,NUM_DRAFT_TOKENS]' -> engine keyword arguments plus a label."""
    parts = [int(x) for x in text.split(",")]
    if not 2 <= len(parts) <= 3:
        raise argparse.ArgumentTypeError(f"config {text!r}: want STEPS,TOPK[,NUM_DRAFT_TOKENS]")
    steps, topk = parts[:2]
    ndt = parts[2] if len(parts) == 3 else None
    nodes = steps * topk + 1 if ndt is None else ndt  # EngineConfig's default
    label = f"chain s{steps}" if topk == 1 and nodes == steps + 1 else f"tree s{steps} k{topk} n{nodes}"
    return {"label": label, "speculative_num_steps": steps, "speculative_eagle_topk": topk,
            "speculative_num_draft_tokens": ndt}


def _sampling_params(mode: str, first: int, n: int, new_tokens: int, seed: int) -> list[dict]:
    """One dict per prompt; T=1 seeds each prompt by its global index, the same for every config."""
    base = dict(MODES[mode], max_new_tokens=new_tokens, ignore_eos=True)
    if mode == "greedy":
        return [base] * n
    return [dict(base, sampling_seed=seed + first + i) for i in range(n)]


def _run(engine, prompts, bs: int, mode: str, new_tokens: int, seed: int) -> dict:
    """Generate for `prompts` in batches of `bs`; time, outputs and the engine's speculative counters."""
    rounds0, acc0 = engine.stats["spec_verify_rounds"], engine.stats["spec_accepted_tokens"]
    outs = []
    t = time.perf_counter()
    for i in range(0, len(prompts), bs):
        chunk = prompts[i : i + bs]
        sp = _sampling_params(mode, i, len(chunk), new_tokens, seed)
        outs.extend(o["output_ids"] for o in engine.generate(input_ids=chunk, sampling_params=sp))
    dt = time.perf_counter() - t
    rounds = engine.stats["spec_verify_rounds"] - rounds0
    accepted = engine.stats["spec_accepted_tokens"] - acc0
    return {"seconds": dt, "outputs": outs, "tokens": sum(len(o) for o in outs), "verify_rounds": rounds,
            "accepted": accepted}


def bench(model_path: str | None, drafter: str, batch_sizes: list[int], configs: list[dict], new_tokens: int,
          dtype: str, seed: int, min_prompts: int, threads: int | None = None, deterministic: bool = False,
          workload: str = "chat", log=print) -> dict:
    """Load the engines, run every (batch size, mode, config) and return the results table."""
    import tlt

    if drafter != "random" and not os.path.exists(os.path.join(drafter, "config.json")):
        raise SystemExit(f"no drafter at {drafter!r}: train one (tlt train-drafter --out {drafter}) "
                         "or pass --drafter random")
    common = dict(dtype=dtype, random_seed=0, torch_num_threads=threads or None,
                  enable_deterministic_inference=deterministic)
    t0 = time.perf_counter()
    log(f"loading engine without speculation ({dtype}, {threads or 'default'} torch threads) ...")
    engines = {"no spec": tlt.Engine(model_path, **common)}
    base = engines["no spec"]
    tmp = None
    if drafter == "random":
        from tlt.engine.spec.drafter import EagleDrafter

        tmp = tempfile.TemporaryDirectory(prefix="tlt_random_drafter_")
        EagleDrafter.random(base.model_config, seed=0, draft_vocab_size=8192).save(tmp.name)
        log("random drafter: acceptance near zero, a lower bound (for testing)")
    for cfg in configs:
        log(f"loading engine with {cfg['label']} ...")
        kw = {k: v for k, v in cfg.items() if k != "label"}
        engines[cfg["label"]] = tlt.Engine(model_path, speculative_draft_model_path=tmp.name if tmp else drafter,
                                           **common, **kw)
    if tmp is not None:
        tmp.cleanup()  # loaded: engines keep nothing open
    load_s = time.perf_counter() - t0
    n_prompts = max(max(batch_sizes), min_prompts)
    prompts = task_prompts(base.tokenizer, workload, n_prompts, ARITHMETIC_SEED)
    # Warm-up, untimed: first-call allocations and oneDNN kernel selection in both modes, then the largest batch at
    # full length, so that the KV cache has grown to its final size before anything is timed (as `tlt bench engine`
    # does). With the short warm-up alone, the first timed run (plain decoding, batch 1) once measured 47.4 tok/s
    # against 52.7 in a run minutes earlier, which flattered every speculative config at batch 1.
    for label, e in engines.items():
        log(f"warm-up: {label}")
        warm = [dict(MODES[m], max_new_tokens=8, ignore_eos=True, sampling_seed=seed) for m in MODES]
        e.generate(input_ids=prompts[: len(warm)], sampling_params=warm)
        e.generate(input_ids=prompts[: max(batch_sizes)], sampling_params=dict(MODES["greedy"], ignore_eos=True,
                                                                                 max_new_tokens=new_tokens))

    rows = []
    labels = list(engines)
    total = len(batch_sizes) * len(MODES) * len(labels)
    for bs in batch_sizes:
        ps = prompts[: max(bs, min_prompts)]
        for mode in MODES:
            ref = None
            for label in labels:
                r = _run(engines[label], ps, bs, mode, new_tokens, seed)
                tok_s = r["tokens"] / r["seconds"]
                row = {"mode": mode, "batch_size": bs, "config": label, "num_prompts": len(ps),
                       "tokens": r["tokens"], "seconds": r["seconds"], "tok_s": tok_s, "speedup": 1.0,
                       "accept_len": None, "verify_rounds": r["verify_rounds"], "identical_frac": None}
                if ref is None:
                    ref = r
                else:
                    same = sum(a == b for a, b in zip(r["outputs"], ref["outputs"]))
                    row["speedup"] = tok_s / (ref["tokens"] / ref["seconds"])
                    row["accept_len"] = r["accepted"] / max(r["verify_rounds"], 1) + 1
                    row["identical_frac"] = same / len(ps)
                rows.append(row)
                extra = "" if row["accept_len"] is None else (
                    f"  x{row['speedup']:.2f}  accept {row['accept_len']:.2f}"
                    f"  identical {round(row['identical_frac'] * len(ps))}/{len(ps)}")
                log(f"[{len(rows):>3}/{total}] {mode:<6} bs={bs:<3} {label:<16} {tok_s:8.1f} tok/s"
                    f"  ({r['seconds']:.1f} s){extra}")
    for e in engines.values():
        e.shutdown()
    res = _summary(rows, configs, batch_sizes, new_tokens, dtype, min_prompts, seed, drafter, model_path, load_s)
    res["config"]["enable_deterministic_inference"] = deterministic
    res["config"]["workload"] = workload
    return res


def _summary(rows, configs, batch_sizes, new_tokens, dtype, min_prompts, seed, drafter, model_path,
             load_s) -> dict:
    res: dict = {}
    spec = [r for r in rows if r["accept_len"] is not None]
    bs1 = [r for r in spec if r["mode"] == "greedy" and r["batch_size"] == 1]
    if bs1:
        best = max(bs1, key=lambda r: r["tok_s"])
        res["speedup_bs1"] = best["speedup"]
        res["accept_len_bs1"] = best["accept_len"]
        res["best_config_bs1"] = best["config"]
    else:
        res["speedup_bs1"] = res["accept_len_bs1"] = res["best_config_bs1"] = None
    res["greedy_identical_frac"] = {}
    res["sampled_identical_frac"] = {}
    for cfg in configs:
        for mode, key in (("greedy", "greedy_identical_frac"), ("T=1", "sampled_identical_frac")):
            rs = [r for r in spec if r["config"] == cfg["label"] and r["mode"] == mode]
            n = sum(r["num_prompts"] for r in rs)
            res[key][cfg["label"]] = sum(r["identical_frac"] * r["num_prompts"] for r in rs) / max(n, 1)
    res["table"] = rows
    res["config"] = {"model": model_path or "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)", "dtype": dtype,
                     "drafter": drafter, "batch_sizes": batch_sizes, "new_tokens": new_tokens,
                     "min_prompts": min_prompts, "sampling_seed": seed,
                     "spec_configs": configs, "load_s": load_s}
    res["machine"] = machine()
    return res


def plot(res: dict, path: str) -> None:
    """Speedup vs batch size, one line per config; greedy and T=1 side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODES), figsize=(11, 4.2), sharey=True)
    labels = list(dict.fromkeys(r["config"] for r in res["table"] if r["accept_len"] is not None))
    for ax, mode in zip(axes, MODES):
        ax.axhline(1.0, color="grey", lw=1, ls="--", label="no spec")
        for label in labels:
            rs = [r for r in res["table"] if r["mode"] == mode and r["config"] == label]
            acc = sum(r["accept_len"] for r in rs) / len(rs)
            ax.plot([r["batch_size"] for r in rs], [r["speedup"] for r in rs], marker="o",
                    label=f"{label} (mean accept length {acc:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["config"]["batch_sizes"], [str(b) for b in res["config"]["batch_sizes"]])
        ax.set_xlabel("batch size")
        ax.set_title(mode)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup vs no speculation (tok/s)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"EAGLE speculative decoding, {os.path.basename(str(res['config']['model']))}, "
                 f"{res['config']['dtype']}, {res['config']['new_tokens']} new tokens")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    t = time.perf_counter()
    configs = [parse_config(c) for c in args.configs]
    if len({c["label"] for c in configs}) < len(configs):
        raise SystemExit("--configs: each config once")
    res = bench(args.model_path, args.drafter, args.batch_sizes, configs, args.new_tokens, args.dtype,
                args.seed, args.min_prompts, args.threads, args.deterministic, args.workload,
                log=lambda m: print(m, flush=True))
    if args.json:
        res["plot"] = os.path.splitext(args.json)[0] + ".png"
        plot(res, res["plot"])
    res["total_s"] = time.perf_counter() - t
    print(f"total {res['total_s']:.1f} s", flush=True)
    return res


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default="benchmarks/results/spec_decoding.json", help="the PNG goes beside it")
    p.add_argument("--drafter", default="benchmarks/drafters/smollm2",
                   help="drafter folder (tlt train-drafter), or 'random' (acceptance near zero, for testing)")
    p.add_argument("--model-path", default=None, help="target (default: embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 2, 4, 8, 16, 32, 64], help="comma-separated (default: 1,2,4,8,16,32,64)")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="STEPS,TOPK[,NDT]",
                   help="speculative configs (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-prompts", type=int, default=8, help="prompts per batch size at least (in batches)")
    p.add_argument("--seed", type=int, default=1234, help="T=1: prompt i uses sampling_seed seed + i")
    # One thread: on a shared 2-core machine two OpenMP threads stall at every barrier while another
    # process holds a core (measured 2.7x slower at batch 1 here); 0 lets torch choose.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: torch's choice (default: 1)")
    p.add_argument("--workload", default="chat", choices=["chat", "arithmetic"],
                   help="prompts: open chat questions, or the GRPO demo's arithmetic word problems (default: chat)")
    p.add_argument("--deterministic", action="store_true",
                   help="every engine with enable_deterministic_inference (speculative == plain, token for token)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    args = p.parse_args(argv)
    write_json(args.json, run(args))


if __name__ == "__main__":
    main()
