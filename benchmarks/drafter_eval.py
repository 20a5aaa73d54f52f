"""How well drafters agree with the target: top-1 per draft depth (training-time test) on fixed workloads.

    python -m benchmarks.drafter_eval --drafters benchmarks/drafters/smollm2 OTHER_DIR \
        [--heldout benchmarks/drafters/smollm2/train_data.pt] --json benchmarks/results/drafter_eval.json

Workloads (SmolLM2-135M, bfloat16, 64 new tokens each; the same sequences for every drafter):
- `chat_greedy`: the speculative benchmark's first 16 chat prompts, greedy (what `tlt bench spec` decodes);
- `arithmetic_greedy` / `arithmetic_t1`: 16 arithmetic word problems with a seed of their own (not in any
  training set), greedy and T=1 (what `tlt bench adaptive` and the GRPO demo decode);
- `heldout` (with `--heldout`): the first `--heldout-records` records of a `tlt train-drafter --keep-data`
  cache, which that run held out of training.

For each: top-1 agreement with the target at draft depths 1..3 over whole sequences (the drafter fed its
own outputs as at inference), the expected tokens per chain round they imply, and the share of generated
tokens inside the drafter's vocabulary. Cheaper than timing a speculative run, and free of timing noise.
"""

from __future__ import annotations

import argparse
import os

from benchmarks.common import ARITHMETIC_SEED, chat_prompts, machine, task_prompts, write_json


def _records(engine, prompts: list[list[int]], sampling_params) -> list[dict]:
    records: list[dict] = []
    engine.set_drafter_data_sink(records.append)
    try:
        engine.generate(input_ids=prompts, sampling_params=sampling_params)
    finally:
        engine.set_drafter_data_sink(None)
    return records


def run(args) -> dict:
    import torch

    import tlt
    from tlt.drafter_sync.buffer import training_items
    from tlt.drafter_sync.training import evaluate_items, expected_tokens
    from tlt.engine.models.rope import RotaryTable
    from tlt.engine.spec.drafter import EagleDrafter

    engine = tlt.Engine(dtype="bfloat16", random_seed=0)
    tok, mc = engine.tokenizer, engine.model_config
    arith = task_prompts(tok, "arithmetic", 16, ARITHMETIC_SEED)
    greedy = {"temperature": 0, "max_new_tokens": args.new_tokens}
    t1 = [{"temperature": 1.0, "max_new_tokens": args.new_tokens, "sampling_seed": i} for i in range(len(arith))]
    workloads = {"chat_greedy": _records(engine, chat_prompts(tok, 16), greedy),
                 "arithmetic_greedy": _records(engine, arith, greedy),
                 "arithmetic_t1": _records(engine, arith, t1)}
    if args.heldout:
        records, _ = torch.load(args.heldout)
        workloads["heldout"] = records[: args.heldout_records]
    embed = torch.nn.Embedding.from_pretrained(engine.model.embed.weight.detach().float(), freeze=True)
    longest = max(len(r["tokens"]) for rs in workloads.values() for r in rs) + 8
    rope = RotaryTable(mc.head_dim, mc.rope_theta, mc.rope_scaling, longest, "cpu", torch.float32)
    out: dict = {}
    for path in args.drafters:
        drafter = EagleDrafter.load(path, mc)
        vocab = set(drafter.d2t.tolist())
        res = {"version": drafter.cfg.version, "draft_vocab_size": drafter.cfg.draft_vocab_size}
        for name, records in workloads.items():
            items = training_items(records, lambda h: engine.model.logits(h.to(engine.dtype)), drafter.d2t)
            accs = evaluate_items(drafter, embed, rope, items, 3)
            gen = [t for r in records for t in r["tokens"][r["prompt_len"]:].tolist()]
            res[name] = {"top1_per_depth": [round(a, 4) for a in accs],
                         "expected_tokens_per_chain_round": round(expected_tokens(accs), 4),
                         "draft_vocab_coverage": round(sum(t in vocab for t in gen) / max(len(gen), 1), 4)}
            print(f"{os.path.relpath(path)}  {name}: top-1 per depth "
                  f"{' '.join(f'{a:.3f}' for a in accs)}  expected tokens per round {expected_tokens(accs):.3f}  "
                  f"coverage {res[name]['draft_vocab_coverage']:.3f}", flush=True)
        out[os.path.relpath(path)] = res
    engine.shutdown()
    return {"machine": machine(), "config": {"new_tokens": args.new_tokens, "heldout": args.heldout,
                                             "heldout_records": args.heldout_records}, "drafters": out}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafters", nargs="+", default=["benchmarks/drafters/smollm2"])
    p.add_argument("--heldout", default=None, help="a train_data.pt of tlt train-drafter --keep-data")
    p.add_argument("--heldout-records", type=int, default=64, help="its first records (the run's held-out ones)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", default="benchmarks/results/drafter_eval.json")
    args = p.parse_args(argv)
    write_json(args.json, run(args))


if __name__ == "__main__":
    main()
