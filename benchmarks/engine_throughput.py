"""Engine throughput: tlt vs `transformers.generate`, greedy, bfloat16, SmolLM2-135M, same work.

    python -m benchmarks.engine_throughput --json benchmarks/results/engine.json
    tlt bench engine --json benchmarks/results/engine.json

64 distinct chat prompts, 128 new tokens each (ignore_eos). Batch 64: all prompts submitted at once
(tlt) / one left-padded batch (HF). Batch 1: the first `--bs1-prompts` prompts one at a time, for both.
Both sides run in this one process, alternating, so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import chat_prompts, machine, write_json


def _tlt_run(engine, prompts, new_tokens, batch: bool) -> tuple[float, list[list[int]]]:
    sp = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    t = time.perf_counter()
    if batch:
        outs = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=sp)]
    else:
        outs = [engine.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in prompts]
    return time.perf_counter() - t, outs


@torch.inference_mode()
def _hf_run(model, tokenizer, prompts, new_tokens, batch: bool) -> tuple[float, list[list[int]]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    groups = [prompts] if batch else [[p] for p in prompts]
    outs = []
    t = time.perf_counter()
    for g in groups:
        L = max(len(p) for p in g)
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in g])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in g])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        outs.extend(gen[:, L:].tolist())
    return time.perf_counter() - t, outs


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of the leading tokens that agree (bf16 numerics may diverge after a near-tie)."""
    fr = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        fr.append(n / max(len(x), 1))
    return sum(fr) / len(fr)


def run(args) -> dict:
    import tlt
    from tlt.engine.models.weights import default_model_path

    print("loading tlt engine (bfloat16) ...", flush=True)
    t = time.perf_counter()
    engine = tlt.Engine(dtype="bfloat16", random_seed=0)
    tlt_load = time.perf_counter() - t
    prompts = chat_prompts(engine.tokenizer, args.num_prompts)
    bs1_prompts = prompts[: args.bs1_prompts]
    print("loading transformers model (bfloat16, from the same GGUF) ...", flush=True)
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    import os

    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.bfloat16)
    hf.eval()
    hf_load = time.perf_counter() - t
    N = args.new_tokens
    print("warm-up ...", flush=True)
    # Warm-up both with the measured batch-64 run (first-call allocations, oneDNN kernel selection, and tlt's KV
    # cache grown to 64 rows of prompt + N tokens, which an engine serving rollouts allocates once and keeps: the
    # steady state of an RL job). Before session 8 the warm-up was 4 prompts x 8 tokens, so tlt's batch-64 figure
    # included growing the cache (~0.5 s of zero-filling, -12%).
    _tlt_run(engine, prompts, N, True)
    _hf_run(hf, engine.tokenizer, prompts, N, True)

    res = {}
    print(f"batch {len(prompts)}: tlt ...", flush=True)
    dt, tlt64 = _tlt_run(engine, prompts, N, True)
    res["tlt_bs64_tok_s"] = len(prompts) * N / dt
    print(f"  {res['tlt_bs64_tok_s']:.1f} tok/s; transformers ...", flush=True)
    dt, hf64 = _hf_run(hf, engine.tokenizer, prompts, N, True)
    res["hf_bs64_tok_s"] = len(prompts) * N / dt
    print(f"  {res['hf_bs64_tok_s']:.1f} tok/s", flush=True)
    print(f"batch 1 ({len(bs1_prompts)} prompts one at a time): tlt ...", flush=True)
    dt, tlt1 = _tlt_run(engine, bs1_prompts, N, False)
    res["tlt_bs1_tok_s"] = len(bs1_prompts) * N / dt
    print(f"  {res['tlt_bs1_tok_s']:.1f} tok/s; transformers ...", flush=True)
    dt, hf1 = _hf_run(hf, engine.tokenizer, bs1_prompts, N, False)
    res["hf_bs1_tok_s"] = len(bs1_prompts) * N / dt
    print(f"  {res['hf_bs1_tok_s']:.1f} tok/s", flush=True)
    res["speedup_bs64"] = res["tlt_bs64_tok_s"] / res["hf_bs64_tok_s"]
    res["speedup_bs1"] = res["tlt_bs1_tok_s"] / res["hf_bs1_tok_s"]
    res["greedy_prefix_agreement_bs64"] = _agreement(tlt64, hf64)
    res["greedy_prefix_agreement_bs1"] = _agreement(tlt1, hf1)
    res["config"] = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)", "dtype": "bfloat16",
                     "num_prompts": len(prompts), "bs1_prompts": len(bs1_prompts), "new_tokens": N,
                     "tlt_load_s": tlt_load, "hf_load_s": hf_load}
    res["machine"] = machine()
    engine.shutdown()
    return res


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default="benchmarks/results/engine_throughput.json")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--bs1-prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    args = p.parse_args(argv)
    write_json(args.json, run(args))


if __name__ == "__main__":
    main()
