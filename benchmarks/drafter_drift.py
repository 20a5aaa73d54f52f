"""Drafter drift: the policy is fine-tuned step by step; the drafter frozen at step 0 vs the online drafter
trained only in idle time.

    tlt bench drafter-drift --json benchmarks/results/drafter_drift.json
    # = python -m benchmarks.drafter_drift --json ...

The policy is SmolLM2-135M-Instruct (the embedded GGUF) served by tlt in bfloat16. The drift is `--steps` K
steps of supervised fine-tuning of a transformers copy of the served weights (LlamaForCausalLM filled from the
engine by HF names; AdamW, bf16 autocast, loss on answer tokens) towards a distinctive answer template on
seeded arithmetic word problems ("Here we go! 23 and 14 make 37, and 37 take away 6 leaves 31. ..."), a voice
the model does not use before. Its outputs change measurably: the JSON reports per step the share of
rollouts in the template and the share with the right number. After every step the new weights go into the
engines with `update_weights_from_tensor(..., weight_version=str(step))`.

Two engines serve the same policy at every step, each with one fixed speculative arm (`--arm`) so that
accept lengths compare across steps: (a) keeps the offline drafter of step 0 (`--drafter`); (b) serves the
versions of an `OnlineDrafter` fed by (b)'s own rollouts. Both roll out the same held-out problems with the same
per-sample seeds at every step (and, the speculation being lossless, emit the same tokens up to bfloat16
near-ties). The acceptance-collapse fallback is off in both (speculative_collapse_ratio=0): the measurement
needs every round to speculate.

Idle time on one machine. In a disaggregated RL system the rollout hardware idles while the trainer computes
the policy update on its own hardware. Here both share one CPU, so that window is emulated: the SFT step runs
and is timed, then the spot trainer gets a window of the same length, ended by `should_yield` turning True (the
trainer is not told the deadline; it sees only the flag, as it would see rollout work arriving). The new
weights and the next rollouts wait until it has yielded and published. `trainer_overhead` is the time the
spot trainer took from rollouts: its preemption latency (flag -> return, the publish included) plus the time
the data sink spent inside (b)'s rollouts, over (b)'s rollout time. It never runs during a rollout, so no
round is slowed otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time

from benchmarks.common import machine, write_json

NAMES = ["Nia", "Omar", "Pia", "Quinn", "Rosa", "Tariq", "Uma", "Vik", "Wen", "Xena", "Yuri", "Zara"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "cards", "toys", "eggs",
         "flowers", "rocks"]
QUESTION = "{who} has {a} {item} and finds {b} more, then loses {c}. How many {item} does {who} have now?"
TEMPLATE = ("Here we go! {a} and {b} make {s}, and {s} take away {c} leaves {r}. That means there are {r} {item} "
            "now. Great question!")
OPENING = "Here we go!"
TARGETS = {"accept_ratio_last": 1.3, "retention_last": 0.9, "trainer_overhead": 0.03}


def problems(n: int, seed: int) -> list[dict]:
    """n word problems (add, then subtract) with their template answers, from a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(10, 60), rng.randint(2, 30), rng.randint(2, 9)
        who, item = rng.choice(NAMES), rng.choice(ITEMS)
        v = {"who": who, "item": item, "a": a, "b": b, "c": c, "s": a + b, "r": a + b - c}
        out.append({"question": QUESTION.format(**v), "answer": TEMPLATE.format(**v), "result": v["r"]})
    return out


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                          add_generation_prompt=True))


def trainable_copy(engine):
    """A transformers causal LM holding the engine's current weights in float32 (filled by HF names)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tlt.engine.models.decoder import hf_weight_map
    from tlt.engine.models.weights import load_hf_config

    cfg = load_hf_config(engine.checkpoint_kind, engine.checkpoint_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    state = {name: engine.get_weights_by_name(name).float() for name in hf_weight_map(engine.model_config)}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not match the transformers model: {missing[:3]} {unexpected[:3]}")
    # rotary tables are buffers computed at construction: rebuild them off the meta device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.to(engine.device)


def sft_batch(tokenizer, items: list[dict], device):
    """Prompt + answer + end-of-turn, right-padded; labels only on the answer and the end-of-turn token."""
    import torch

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seqs, labels = [], []
    for it in items:
        prompt = chat_ids(tokenizer, it["question"])
        answer = tokenizer.encode(it["answer"]) + [end]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), end, dtype=torch.long)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(y), 1
    return ids.to(device), mask.to(device), lab.to(device)


def sft_step(model, opt, batch) -> float:
    """One AdamW step of next-token cross-entropy (bf16 autocast, float32 master weights); the loss."""
    import torch

    ids, mask, labels = batch
    model.train()
    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def rollout(engine, ids, sps) -> dict:
    """One rollout step on `engine`: outputs, wall time and the mean accept length (1 + accepted per round)."""
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=ids, sampling_params=sps)
    seconds = time.perf_counter() - t0
    ver = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    acc = sum(o["meta_info"]["spec_accept_token_num"] for o in outs)
    return {"outs": outs, "seconds": seconds, "accept_len": 1 + acc / ver if ver else None,
            "tokens": sum(len(o["output_ids"]) for o in outs), "verify_rounds": ver,
            "drafter_versions": sorted({o["meta_info"]["drafter_version"] for o in outs})}


def answer_quality(outs, tasks) -> tuple[float, float]:
    """Share of outputs in the template (its opening) and share whose last number is the right result."""
    in_template = sum(o["text"].strip().startswith(OPENING) for o in outs) / len(outs)
    right = 0
    for o, t in zip(outs, tasks):
        nums = re.findall(r"-?\d+", o["text"])
        right += bool(nums) and int(nums[-1]) == t["result"]
    return in_template, right / len(outs)


def bench(args, log=print) -> dict:
    import torch

    import tlt
    from tlt.drafter_sync import OnlineDrafter

    if args.threads:
        torch.set_num_threads(args.threads)
    # one arm, fixed for every round (the selector is built only to accept any arm's KV margin)
    common = dict(dtype=args.dtype, random_seed=args.seed, speculative_draft_model_path=args.drafter,
                  speculative_adaptive=True, speculative_arms=[args.arm], speculative_collapse_ratio=0.0,
                  max_running_requests=max(args.prompts, 1), torch_num_threads=args.threads or None)
    t = time.perf_counter()
    frozen = tlt.Engine(args.model_path, **common)
    online = tlt.Engine(args.model_path, **common)
    for e in (frozen, online):
        e.set_speculation(args.arm)
    log(f"two engines loaded in {time.perf_counter() - t:.1f} s; arm {args.arm}, drafter {args.drafter}")
    od = OnlineDrafter(online, args.drafter, batch_size=args.spot_batch, window=args.spot_window, lr=args.spot_lr,
                       warmup_steps=5, seed=args.seed)
    policy = trainable_copy(online)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    tok = online.tokenizer
    held_out = problems(args.prompts, args.seed + 1)
    ids = [chat_ids(tok, p["question"]) for p in held_out]
    sps = [{"temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "sampling_seed": args.seed + i}
           for i in range(len(ids))]
    train_pool = problems(args.steps * args.sft_batch, args.seed + 2)
    steps = []
    for k in range(args.steps + 1):
        a = rollout(frozen, ids, sps)
        sink_before = od.sink_time_s
        b = rollout(online, ids, sps)
        template_rate, accuracy = answer_quality(b["outs"], held_out)
        row = {"step": k, "weight_version": online.weight_version, "drafter_version_online": b["drafter_versions"],
               "accept_len_frozen": a["accept_len"], "accept_len_online": b["accept_len"],
               "rollout_s_frozen": a["seconds"], "rollout_s_online": b["seconds"], "tokens_frozen": a["tokens"],
               "tokens_online": b["tokens"], "sink_s": od.sink_time_s - sink_before,
               "identical": sum(x["output_ids"] == y["output_ids"] for x, y in zip(a["outs"], b["outs"])) / len(ids),
               "template_rate": template_rate, "accuracy": accuracy, "sample": b["outs"][0]["text"][:240]}
        line = (f"step {k:2d}  accept len frozen {a['accept_len']:.2f}  online {b['accept_len']:.2f} "
                f"({b['drafter_versions'][0]})  template {template_rate:.2f}  right {accuracy:.2f}  "
                f"rollouts {a['seconds']:.1f} / {b['seconds']:.1f} s")
        if k < args.steps:
            # the policy trainer's step (on other hardware in a real system): timed, it sets the idle window
            batch = sft_batch(tok, train_pool[k * args.sft_batch: (k + 1) * args.sft_batch], online.device)
            t0 = time.perf_counter()
            row["sft_loss"] = sft_step(policy, opt, batch)
            row["update_s"] = time.perf_counter() - t0
            deadline = time.perf_counter() + row["update_s"]
            spot = od.train_idle(lambda end=deadline: time.perf_counter() >= end)
            row.update(spot_steps=spot["steps"], spot_bad_steps=spot["bad_steps"], spot_stopped=spot["stopped"],
                       preemption_latency_s=spot["preemption_latency_s"] or 0.0, published=spot["published"],
                       spot_loss=od.spot.last_loss, spot_acc=od.spot.last_acc)
            named = [(n, p.detach()) for n, p in policy.named_parameters()]
            for e in (frozen, online):
                e.update_weights_from_tensor(named, weight_version=str(k + 1))
            od.on_policy_update(str(k + 1))
            line += (f"  | sft loss {row['sft_loss']:.3f} in {row['update_s']:.1f} s, spot {spot['steps']} steps "
                     f"-> {spot['published']}, yield latency {row['preemption_latency_s'] * 1000:.0f} ms")
        log(line)
        steps.append(row)
    spot_train_s = od.spot.train_time_s
    od.close()
    frozen.shutdown()
    online.shutdown()

    fa = [s["accept_len_frozen"] for s in steps]
    ob = [s["accept_len_online"] for s in steps]
    rollout_s = sum(s["rollout_s_online"] for s in steps)
    preempt = sum(s.get("preemption_latency_s", 0.0) for s in steps)
    sink = sum(s["sink_s"] for s in steps)
    res = {
        "benchmark": "drafter_drift", "machine": machine(), "dtype": args.dtype, "drafter": args.drafter,
        "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "accept_ratio_last": ob[-1] / fa[-1],
        "retention_last": ob[-1] / ob[0],
        "trainer_overhead": (preempt + sink) / rollout_s,
        "overhead": {"preemption_s": preempt, "sink_s": sink, "rollout_s_online": rollout_s,
                     "idle_window_s": sum(s.get("update_s", 0.0) for s in steps), "spot_train_s": spot_train_s},
        "rollout_speedup_last": steps[-1]["rollout_s_frozen"] / steps[-1]["rollout_s_online"],
        "accept_len_frozen": fa, "accept_len_online": ob,
        "targets": TARGETS,
        "steps": steps,
    }
    res["met"] = {"accept_ratio_last": res["accept_ratio_last"] >= TARGETS["accept_ratio_last"],
                  "retention_last": res["retention_last"] >= TARGETS["retention_last"],
                  "trainer_overhead": res["trainer_overhead"] < TARGETS["trainer_overhead"]}
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in res["steps"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, res["accept_len_frozen"], "o-", label="(a) drafter frozen at step 0")
    ax.plot(steps, res["accept_len_online"], "s-", label="(b) online drafter, idle-time training")
    ax.set_xlabel("policy step (SFT updates so far)")
    ax.set_ylabel(f"mean accept length ({res['config']['arm']})")
    ax2 = ax.twinx()
    ax2.plot(steps, [s["template_rate"] for s in res["steps"]], ":", color="grey", label="rollouts in the new style")
    ax2.set_ylabel("share of rollouts in the new style")
    ax2.set_ylim(-0.02, 1.02)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
    ax.set_title(f"Policy drift: (b)/(a) = {res['accept_ratio_last']:.2f}x at the last step, "
                 f"trainer overhead {100 * res['trainer_overhead']:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write the results here (and a PNG plot beside it)")
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--drafter", default="benchmarks/drafters/smollm2", help="step-0 drafter (tlt train-drafter)")
    p.add_argument("--arm", default="s3k1n4", help="the fixed speculative arm of both engines")
    p.add_argument("--steps", type=int, default=10, help="SFT steps K (rollouts at steps 0..K)")
    p.add_argument("--sft-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="SFT learning rate")
    p.add_argument("--prompts", type=int, default=16, help="held-out problems rolled out per step")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--spot-batch", type=int, default=2, help="sequences per spot step (small: yields sooner)")
    p.add_argument("--spot-window", type=int, default=64, help="positions per sequence in a spot step")
    p.add_argument("--spot-lr", type=float, default=1e-3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tlt bench drafter-drift", description=__doc__.split("\n")[0])
    add_args(p)
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.drafter, "config.json")):
        raise SystemExit(f"no drafter at {args.drafter}: train one with `tlt train-drafter --out {args.drafter}`")
    t = time.perf_counter()
    res = bench(args, log=lambda m: print(m, flush=True))
    res["bench_s"] = time.perf_counter() - t
    if args.json:
        res["plot"] = os.path.splitext(args.json)[0] + ".png"
        plot(res, res["plot"])
    write_json(args.json, res)


if __name__ == "__main__":
    main()
