"""`tlt` command line: generate | serve | bench | demo."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help="HF folder or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--random-seed", type=int, default=0)


def _make_engine(args):
    import tlt

    return tlt.Engine(model_path=args.model_path, tokenizer_path=args.tokenizer_path, dtype=args.dtype,
                      device=args.device, context_length=args.context_length, random_seed=args.random_seed)


async def _generate_with_progress(engine, label: str, **kwargs):
    """Run `async_generate`, printing one progress line (tokens, tok/s) about twice a second."""
    start_tokens = engine.stats["generated_tokens"]
    t0 = time.perf_counter()
    task = asyncio.ensure_future(engine.async_generate(**kwargs))
    while not task.done():
        await asyncio.sleep(0.5)
        n = engine.stats["generated_tokens"] - start_tokens
        dt = time.perf_counter() - t0
        print(f"\r{label}: {n} tokens, {n / max(dt, 1e-9):.1f} tok/s, {engine.get_stats()['running']} running",
              end="", file=sys.stderr, flush=True)
    outs = task.result()
    n = engine.stats["generated_tokens"] - start_tokens
    dt = time.perf_counter() - t0
    print(f"\r{label}: {n} tokens in {dt:.2f} s = {n / dt:.1f} tok/s" + " " * 20, file=sys.stderr, flush=True)
    return outs, n, dt


def cmd_generate(args) -> None:
    engine = _make_engine(args)
    prompts = args.prompt or ["What is the capital of France?"]
    if args.chat:
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True) for p in prompts]
    sp = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
          "top_k": args.top_k, "n": args.n}
    if args.seed is not None:
        sp["sampling_seed"] = args.seed
    outs, _, _ = asyncio.run(_generate_with_progress(engine, "generate", prompt=prompts, sampling_params=sp))
    outs = outs if isinstance(outs, list) else [outs]
    for i, o in enumerate(outs):
        print(f"--- [{i}] ({o['meta_info']['completion_tokens']} tokens, {o['meta_info']['finish_reason']})")
        print(o["text"])
    engine.shutdown()


def cmd_demo(rest: list[str]) -> None:
    """The main job: GRPO on SmolLM2 without and with tlt, a table and a report folder (benchmarks/rl_grpo.py)."""
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ beside tlt/
    from benchmarks.rl_grpo import demo

    demo(rest)


def cmd_train_drafter(args) -> None:
    import json

    from tlt.drafter_sync.training import train_offline

    if args.dtype == "auto":
        args.dtype = "bfloat16"
    engine = _make_engine(args)
    res = train_offline(engine, args.out, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                        max_steps=args.max_steps, ttt_steps=args.ttt_steps,
                        draft_vocab_size=args.draft_vocab_size, batch_size=args.batch_size, lr=args.lr,
                        seed=args.random_seed, time_budget_s=args.time_budget, self_prompts=args.self_prompts,
                        holdout=args.holdout, window=args.window, data_cache=args.keep_data,
                        resume=args.resume, num_layers=args.drafter_layers, intermediate_size=args.drafter_mlp,
                        log=lambda m: print(m, flush=True))
    print(json.dumps(res))
    engine.shutdown()


def cmd_bench(args, rest: list[str]) -> None:
    import os

    # benchmarks/ sits beside tlt/ in the checkout and is not installed: make it importable from any cwd.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.which == "engine":
        from benchmarks.engine_throughput import main as bench_main
    elif args.which == "spec":
        from benchmarks.spec_decoding import main as bench_main
    elif args.which == "adaptive":
        from benchmarks.adaptive_rollout import main as bench_main
    elif args.which == "drafter-drift":
        from benchmarks.drafter_drift import main as bench_main
    elif args.which == "rl":
        from benchmarks.rl_grpo import main as bench_main
    elif args.which == "sampling":
        from benchmarks.sampling_speed import main as bench_main
    elif args.which == "drafter-eval":
        from benchmarks.drafter_eval import main as bench_main
    else:
        raise SystemExit(f"unknown benchmark {args.which!r}")
    bench_main(rest)


def cmd_serve(rest: list[str]) -> None:
    from tlt.rl_bridge.http_server import main as serve_main

    serve_main(rest)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="tlt", description="tlt: rollout engine for RL training of LLMs")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text for prompts")
    _engine_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--seed", type=int, default=None, help="sampling_seed (reproducible sampling)")
    sub.add_parser("demo", help="the main job (make run): GRPO without and with tlt (see tlt demo --help)",
                   add_help=False)
    benches = ["engine", "spec", "adaptive", "drafter-drift", "rl", "sampling", "drafter-eval"]
    b = sub.add_parser("bench", help="benchmarks: " + " | ".join(benches), add_help=False)
    b.add_argument("which", choices=benches)
    sub.add_parser("serve", help="SGLang-compatible HTTP server (see tlt serve --help)", add_help=False)
    t = sub.add_parser("train-drafter", help="train an EAGLE-style drafter on the engine's own outputs")
    _engine_args(t)
    t.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    t.add_argument("--num-prompts", type=int, default=256)
    t.add_argument("--max-new-tokens", type=int, default=160)
    t.add_argument("--max-steps", type=int, default=600)
    t.add_argument("--ttt-steps", type=int, default=3, help="training-time-test depth")
    t.add_argument("--draft-vocab-size", type=int, default=8192)
    t.add_argument("--drafter-layers", type=int, default=1, help="decoder layers of the drafter")
    t.add_argument("--drafter-mlp", type=int, default=None, help="the drafter's MLP width (default: the target's)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    t.add_argument("--self-prompts", type=float, default=0.5,
                   help="fraction of the prompts written by the target itself (the rest from templates)")
    t.add_argument("--holdout", type=int, default=64, help="records kept out of training and evaluated")
    t.add_argument("--window", type=int, default=96, help="positions per training sequence (random crop)")
    t.add_argument("--keep-data", action="store_true", help="cache the generated data in OUT/train_data.pt")
    t.add_argument("--resume", action="store_true", help="continue training the drafter already in OUT")
    if argv and argv[0] == "serve":
        return cmd_serve(argv[1:])
    if argv and argv[0] == "demo":
        return cmd_demo(argv[1:])
    if argv and argv[0] == "bench":
        args, rest = p.parse_known_args(argv)
        return cmd_bench(args, rest)
    args = p.parse_args(argv)
    {"generate": cmd_generate, "train-drafter": cmd_train_drafter}[args.cmd](args)


if __name__ == "__main__":
    main()
