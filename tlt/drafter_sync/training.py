"""Drafter training: data from the engine itself, the multi-step "training-time test" loss, a step-wise trainer.

Data. Prompts -> the target's own generations (the engine) -> one target forward over each whole
sequence, capturing the hidden states of the drafter's three aux layers and the target's next-token
distribution at every position. Nothing but the engine's model is needed.

Loss (EAGLE-3's training-time test). Step 1 feeds (token p+1, target feature p) at every position p and
predicts the target's distribution for token p+2. Step k feeds (token p+1, the drafter's own step-(k-1)
output at p-1) and attends exactly as inference does at draft depth k: to step-1 entries at positions
<= p-k+1 (what catch-up wrote from target features), to the step-j entry at position p-k+j for
1 < j < k (its ancestors in the draft), and to itself. Step k's loss is weighted 0.8^(k-1). Labels are
the target's probabilities renormalised over the draft vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tlt.engine.spec.drafter import DrafterConfig, EagleDrafter


@dataclass
class DrafterBatch:
    """Padded training sequences: tokens [B, T], aux hidden [B, T, 3H], target logprobs over the draft
    vocabulary [B, T, Vd] (for the token after each position), valid [B, T]."""

    tokens: torch.Tensor
    aux: torch.Tensor
    target_logp: torch.Tensor
    valid: torch.Tensor


@torch.inference_mode()
def target_features(engine, sequences: list[list[int]], d2t: torch.Tensor, batch_size: int = 8,
                    prompt_lens: list[int] | None = None) -> list[dict]:
    """Run the engine's target over whole sequences: aux hidden states and draft-vocab label logprobs.

    `prompt_lens`: the loss then covers only labels of generated tokens (a shared chat template is
    trivially predictable and would otherwise dominate the loss and flatter the accuracy)."""
    from tlt.engine.kv_cache import KVCache
    from tlt.engine.runner import ModelRunner

    model = engine.model
    aux_layers = DrafterConfig.for_target(engine.model_config).aux_layers
    out = []
    longest = max(len(s) for s in sequences)
    kv = KVCache(engine.model_config, engine.dtype, engine.device,
                 capacity_bytes=batch_size * (longest + 256) * engine.kv.bytes_per_token + (1 << 20),
                 max_rows=batch_size, max_len=longest + 128)
    runner = ModelRunner(model, kv, engine.device)
    d2t = d2t.to(engine.device)

    class _Row:
        kv_len = 0

    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i: i + batch_size]
        kv.clear()
        for _ in chunk:
            kv.add(_Row(), longest)
        hidden, captured = runner.prefill(chunk, 0, aux_layers)
        logits = model.logits(hidden)  # [b, T, V]
        label = torch.log_softmax(logits[..., d2t], dim=-1)  # renormalised over the draft vocabulary
        aux = torch.cat(captured, dim=-1)
        for b, seq in enumerate(chunk):
            n = len(seq)
            # drafter position p is trained on the label of token p+2: generated iff p >= prompt_len - 2
            first = max(prompt_lens[i + b] - 2, 0) if prompt_lens else 0
            out.append({"tokens": torch.tensor(seq), "aux": aux[b, :n].float().cpu(),
                        "target_logp": label[b, :n].to(torch.bfloat16).cpu(),
                        "loss_mask": torch.arange(n) >= first})
    kv.clear()
    return out


def draft_vocab(sequences: list[list[int]], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent tokens in the data (ties and unseen tokens by id): the d2t map."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for s in sequences:
        counts.index_add_(0, torch.tensor(s), torch.ones(len(s), dtype=torch.float64))
    counts -= torch.arange(vocab_size, dtype=torch.float64) * 1e-9  # deterministic tie-break
    return counts.topk(min(size, vocab_size)).indices.sort().values


def crop(item: dict, length: int, g: torch.Generator) -> dict:
    """A random window of at most `length` positions (attention cost is quadratic in it)."""
    n = len(item["tokens"])
    if n <= length:
        return item
    lo = 0
    if "loss_mask" in item and item["loss_mask"].any():  # windows over generated tokens, a little context
        lo = min(max(int(item["loss_mask"].float().argmax()) - 8, 0), n - length)
    start = int(torch.randint(lo, n - length + 1, (1,), generator=g))
    return {k: v[start: start + length] for k, v in item.items()}


def collate(items: list[dict]) -> DrafterBatch:
    T = max(len(x["tokens"]) for x in items)
    B = len(items)
    H3 = items[0]["aux"].shape[-1]
    Vd = items[0]["target_logp"].shape[-1]
    tokens = torch.zeros((B, T), dtype=torch.int64)
    aux = torch.zeros((B, T, H3))
    lab = torch.zeros((B, T, Vd))
    valid = torch.zeros((B, T), dtype=torch.bool)
    for b, x in enumerate(items):
        n = len(x["tokens"])
        tokens[b, :n], aux[b, :n], lab[b, :n] = x["tokens"], x["aux"], x["target_logp"].float()
        valid[b, :n] = x["loss_mask"] if "loss_mask" in x else True
    return DrafterBatch(tokens, aux, lab, valid)


def collate_on(items: list[dict], device) -> DrafterBatch:
    """`collate`, moved to `device`."""
    b = collate(items)
    return DrafterBatch(b.tokens.to(device), b.aux.to(device), b.target_logp.to(device), b.valid.to(device))


def ttt_loss(drafter: EagleDrafter, embed: torch.nn.Module, rope, batch: DrafterBatch, steps: int,
             decay: float = 0.8) -> tuple[torch.Tensor, list[float]]:
    """Multi-step training-time-test loss; returns (loss, per-step top-1 accuracy vs the target)."""
    tok, valid = batch.tokens, batch.valid
    B, T = tok.shape
    P = T - 1  # drafter positions p = 0..T-2: input token p+1, label = target dist at p+1
    dev = tok.device
    pos = torch.arange(P, device=dev)
    cos, sin = rope.lookup(pos.view(1, P).expand(B, P))
    emb = embed(tok[:, 1:]).float()  # [B, P, H] token p+1
    feat = drafter.fc(batch.aux[:, :P])  # [B, P, H] (aux layers already concatenated)
    label = batch.target_logp[:, 1:]  # [B, P, Vd]
    ok = valid[:, 1:] & valid[:, :-1]  # position p: token p+1 exists and its label is trained on
    keys = [[] for _ in drafter.layers]  # per layer, per step: [B, kv_heads, P, D]
    values = [[] for _ in drafter.layers]
    total = torch.zeros((), device=dev)
    accs = []
    q_pos, k_pos = pos.view(P, 1), pos.view(1, P)
    prev_h = None
    for k in range(1, steps + 1):
        if k == 1:
            x_feat = feat
        else:  # the drafter's own output at p-1 (nothing before position 0)
            x_feat = torch.cat([torch.zeros_like(prev_h[:, :1]), prev_h[:, :-1]], dim=1)
        blocks = [k_pos <= q_pos - k + 1]  # step-1 entries
        for j in range(2, k + 1):  # ancestors at step j, and itself (j = k)
            blocks.append(k_pos == q_pos - k + j)
        mask = torch.cat(blocks, dim=1)  # [P, k * P]
        mask[:, 0] |= ~mask.any(dim=1)  # rows with no key (p < k - 1) are ignored by the loss anyway
        h = drafter.layer_input(emb, x_feat)
        for i, layer in enumerate(drafter.layers):
            q, kk, vv = layer.qkv_rotated(h, cos, sin)
            keys[i].append(kk.transpose(1, 2))
            values[i].append(vv.transpose(1, 2))
            h = layer.attend_and_mlp(h, q, torch.cat(keys[i], 2), torch.cat(values[i], 2), mask)
        logits = drafter.head(h).float()
        step_ok = ok & (pos >= k - 1).view(1, P)
        ce = -(label.exp() * torch.log_softmax(logits, dim=-1)).sum(-1)  # [B, P]
        denom = step_ok.sum().clamp(min=1)
        total = total + decay ** (k - 1) * (ce * step_ok).sum() / denom
        with torch.no_grad():
            accs.append(float(((logits.argmax(-1) == label.argmax(-1)) & step_ok).sum() / denom))
        prev_h = h
    return total, accs


@dataclass
class TrainerConfig:
    """Hyper-parameters of drafter training; saved with checkpoints so that a resumed run keeps its schedule."""

    ttt_steps: int = 3  # draft depths trained by the training-time-test loss
    lr: float = 1e-3
    max_steps: int | None = None  # cosine decay to 0 over max_steps; None (online): constant after warm-up
    warmup_steps: int | None = None  # default: max_steps // 20 (at least 1), or 20 without max_steps
    grad_clip: float = 1.0
    autocast: bool = False  # bf16 autocast (off by default: on this CPU its backward measured 2.5x slower)

    def __post_init__(self):
        if self.ttt_steps < 1 or self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"invalid drafter training config {self}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, self.max_steps // 20) if self.max_steps else 20
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be positive, got {self.warmup_steps}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` at optimizer step `step` (linear warm-up, then cosine decay or constant)."""
        warm = min(1.0, (step + 1) / self.warmup_steps)
        if self.max_steps is None:
            return warm
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, self.max_steps) / self.max_steps))


class DrafterTrainer:
    """The drafter's optimisation state (AdamW and its schedule) advanced one batch at a time.

    Step-wise so that training can stop between any two steps (spot training in idle compute) and
    its whole state can be saved and restored. A step that meets a non-finite loss or gradient raises
    `FloatingPointError` before the optimizer touches the weights."""

    def __init__(self, drafter: EagleDrafter, embed: torch.nn.Module, rope, config: TrainerConfig | None = None):
        self.drafter, self.embed, self.rope = drafter, embed, rope
        self.config = config or TrainerConfig()
        self.params = [p for p in drafter.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the drafter has no trainable parameters (call drafter.requires_grad_(True))")
        self.opt = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=0.0, betas=(0.9, 0.95))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.config.lr_factor)
        self.step_count = 0

    def step(self, items: list[dict]) -> dict:
        """One optimizer step on `items` (the format of `target_features`) -> {"loss", "acc" per depth}."""
        dev = next(self.drafter.parameters()).device
        batch = collate_on(items, dev)
        self.drafter.train()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.config.autocast):
            loss, accs = ttt_loss(self.drafter, self.embed, self.rope, batch, self.config.ttt_steps)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite drafter loss at step {self.step_count}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        if not torch.isfinite(norm):
            self.opt.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite drafter gradient at step {self.step_count}")
        self.opt.step()
        self.sched.step()
        self.step_count += 1
        return {"loss": float(loss.detach()), "acc": accs}

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the data: config, drafter, optimizer, schedule, step count.

        Tensors are the live ones (not copies); `torch.save` or a deep copy makes them a snapshot."""
        return {"config": dataclasses.asdict(self.config), "drafter_cfg": dataclasses.asdict(self.drafter.cfg),
                "drafter": self.drafter.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output taken from a trainer of the same drafter shape and config.

        The optimizer keeps references to the tensors of `state` (torch's behaviour): pass a copy when
        `state` must stay untouched by later steps."""
        if state["config"] != dataclasses.asdict(self.config):
            raise ValueError(f"trainer config differs from the saved one: {state['config']}")
        self.drafter.load_state_dict(state["drafter"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step_count = state["step"]
        self.opt.zero_grad(set_to_none=True)


def expected_tokens(accs: list[float]) -> float:
    """Tokens per chain round implied by top-1 agreement per draft depth: 1 + a1 + a1*a2 + ..."""
    expected, run = 1.0, 1.0
    for a in accs:
        run *= a
        expected += run
    return expected


@torch.no_grad()
def evaluate_items(drafter: EagleDrafter, embed, rope, items: list[dict], steps: int, chunk: int = 16) -> list[float]:
    """Training-time-test top-1 agreement per draft depth on `items`, weighted by their trained positions."""
    was_training = drafter.training
    drafter.eval()
    dev = next(drafter.parameters()).device
    hits, counts = [0.0] * steps, [0] * steps
    try:
        for i in range(0, len(items), chunk):
            batch = collate_on(items[i: i + chunk], dev)
            ok = batch.valid[:, 1:] & batch.valid[:, :-1]
            pos = torch.arange(ok.shape[1], device=dev)
            n = [int((ok & (pos >= k).view(1, -1)).sum()) for k in range(steps)]  # ttt_loss's denominators
            _, accs = ttt_loss(drafter, embed, rope, batch, steps)
            hits = [h + a * c for h, a, c in zip(hits, accs, n)]
            counts = [c + m for c, m in zip(counts, n)]
    finally:
        drafter.train(was_training)
    return [h / max(c, 1) for h, c in zip(hits, counts)]


def train_drafter(drafter: EagleDrafter, embed, rope, data, *, steps: int = 3, max_steps: int = 400,
                  batch_size: int = 8, lr: float = 1e-3, seed: int = 0, window: int = 96, autocast: bool = False,
                  log: Callable[[str], None] = print, time_budget_s: float | None = None,
                  heldout: list[dict] | None = None, eval_every: int = 250) -> dict:
    """AdamW with warm-up and cosine decay over `max_steps`; returns the final metrics.

    `data`: training items (the format of `target_features`), or a callable (n, generator) -> n items.
    `heldout`: items never trained on; their top-1 agreement per depth is logged every `eval_every` steps
    and at the end (the training accuracy flatters a drafter that memorises its data)."""
    g = torch.Generator().manual_seed(seed)
    if callable(data):
        sample = data
    else:
        def sample(n: int, gen: torch.Generator) -> list[dict]:
            return [crop(data[i], window, gen) for i in torch.randint(0, len(data), (n,), generator=gen).tolist()]
    trainer = DrafterTrainer(drafter, embed, rope,
                             TrainerConfig(ttt_steps=steps, lr=lr, max_steps=max_steps, autocast=autocast))

    def evaluate(step: int) -> dict:
        accs = evaluate_items(drafter, embed, rope, heldout, steps)
        log(f"  held-out at step {step}: top-1 per depth {' '.join(f'{a:.3f}' for a in accs)}  "
            f"expected tokens per chain round {expected_tokens(accs):.3f}")
        return {"heldout_acc": accs, "heldout_expected_tokens": expected_tokens(accs)}

    t0 = time.perf_counter()
    metrics: dict = {}
    for step in range(max_steps):
        out = trainer.step(sample(batch_size, g))
        metrics = {**metrics, "step": step + 1, **out, "elapsed_s": time.perf_counter() - t0}
        last = step == max_steps - 1 or (time_budget_s is not None and metrics["elapsed_s"] > time_budget_s)
        if step % 20 == 0 or last:
            acc = " ".join(f"{a:.2f}" for a in out["acc"])
            log(f"  step {step + 1}/{max_steps}  loss {out['loss']:.3f}  top-1 per depth {acc}  "
                f"{metrics['elapsed_s']:.0f}s")
        if heldout and ((step + 1) % eval_every == 0 or last):
            metrics.update(evaluate(step + 1))
        if last and step < max_steps - 1:
            log(f"  time budget reached at step {step + 1}")
            break
    drafter.eval()
    return metrics


def build_records(engine, prompts: list[str], max_new_tokens: int, log: Callable[[str], None] = print,
                  chunk: int = 256, seed: int = 0) -> list[dict]:
    """Generate with the engine (half greedy, half T=1 with top-p 0.95) and keep what it computed on the
    way: one record per sequence, as the online drafter's buffer holds them (tokens, aux-layer states,
    last hidden states; no second target pass)."""
    tok = engine.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True)) for p in prompts]
    records: list[dict] = []
    t0 = time.perf_counter()
    half = len(ids) // 2
    engine.set_drafter_data_sink(records.append)
    try:
        # In chunks, with a progress line after each: generating for thousands of prompts takes minutes.
        for start in range(0, len(ids), chunk):
            end = min(start + chunk, len(ids))
            for a, b, sampled in ((start, min(end, half), False), (max(start, half), end, True)):
                if a >= b:
                    continue
                sp = [{"temperature": 1.0, "top_p": 0.95, "max_new_tokens": max_new_tokens,
                       "sampling_seed": seed * 1_000_003 + i} if sampled else
                      {"temperature": 0, "max_new_tokens": max_new_tokens} for i in range(a, b)]
                engine.generate(input_ids=ids[a:b], sampling_params=sp)
            n_tok = sum(len(r["tokens"]) - r["prompt_len"] + 1 for r in records)
            dt = time.perf_counter() - t0
            log(f"  generated for {end}/{len(ids)} prompts: {n_tok} tokens, {n_tok / dt:.0f} tok/s, {dt:.0f}s")
    finally:
        engine.set_drafter_data_sink(None)
    if len(records) != len(ids):
        raise RuntimeError(f"the engine handed over {len(records)} records for {len(ids)} prompts")
    return records


def train_offline(engine, out_dir: str, *, num_prompts: int = 256, max_new_tokens: int = 160,
                  max_steps: int = 600, ttt_steps: int = 3, draft_vocab_size: int = 8192, batch_size: int = 8,
                  lr: float = 2e-3, seed: int = 0, time_budget_s: float | None = None, self_prompts: float = 0.0,
                  holdout: int = 64, window: int = 96, data_cache: bool = False, resume: bool = False,
                  num_layers: int = 1, intermediate_size: int | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """The whole offline recipe: prompts (a `self_prompts` fraction written by the target itself, the rest
    from templates), the target's generations and hidden states, training, the drafter folder written
    atomically. `holdout` records (at most a quarter) are kept out of training and evaluated."""
    import os

    from tlt.drafter_sync.buffer import DrafterDataBuffer, HeadLabels, training_items
    from tlt.drafter_sync.prompts import self_instruct_prompts, training_prompts

    cache = os.path.join(out_dir, "train_data.pt")
    if data_cache and os.path.exists(cache):
        records, info = torch.load(cache)
        log(f"reusing the data in {cache}: {len(records)} records")
    else:
        n_self = int(round(num_prompts * self_prompts))
        log(f"building data: {num_prompts} prompts ({n_self} written by the target) x <= {max_new_tokens} new tokens")
        prompts = training_prompts(num_prompts - n_self, seed)
        if n_self:
            prompts += self_instruct_prompts(engine, n_self, seed, log)
        random.Random(seed).shuffle(prompts)
        t0 = time.perf_counter()
        records = build_records(engine, prompts, max_new_tokens, log, seed=seed)
        gen = sum(len(r["tokens"]) - r["prompt_len"] + 1 for r in records)
        info = {"prompts": len(prompts), "self_prompts": n_self, "generated_tokens": gen,
                "data_s": round(time.perf_counter() - t0, 1)}
        log(f"  generated {gen} tokens for {len(prompts)} prompts in {info['data_s']}s")
        if data_cache:
            os.makedirs(out_dir, exist_ok=True)
            torch.save((records, info), cache)
    n_held = min(holdout, len(records) // 4)
    held, train = records[:n_held], records[n_held:]
    if not train:
        raise ValueError(f"no training records left after holding out {holdout}")
    d2t = draft_vocab([r["tokens"].tolist() for r in train], draft_vocab_size, engine.model_config.vocab_size)
    if resume and os.path.exists(os.path.join(out_dir, "config.json")):
        drafter = EagleDrafter.load(out_dir, engine.model_config)
        drafter.requires_grad_(True)
        if not torch.equal(drafter.d2t.cpu(), d2t):
            raise ValueError(f"the drafter in {out_dir} has another draft vocabulary than the cached data")
        log(f"resuming from the drafter in {out_dir}")
    else:
        drafter = EagleDrafter.random(engine.model_config, seed=seed, draft_vocab_size=len(d2t), num_layers=num_layers,
                                      intermediate_size=intermediate_size)
        with torch.no_grad():
            drafter.d2t.copy_(d2t)
            # Start the head from the target's own output embeddings of the draft vocabulary.
            drafter.lm_head.weight.copy_(engine.model.head_weight.detach().float()[d2t])
            drafter.norm.weight.copy_(engine.model.norm.weight.detach().float())
    embed = torch.nn.Embedding.from_pretrained(engine.model.embed.weight.detach().float(), freeze=True)
    from tlt.engine.models.rope import RotaryTable

    mc = engine.model_config
    longest = max(len(r["tokens"]) for r in records) + 8
    rope = RotaryTable(mc.head_dim, mc.rope_theta, mc.rope_scaling, longest, "cpu", torch.float32)

    label_fn = HeadLabels(lambda: engine.model.head_weight.detach())  # the draft vocabulary's rows only

    buf = DrafterDataBuffer(sum(r["aux"].nbytes + r["hidden"].nbytes + r["tokens"].nbytes for r in train) + 1,
                            recency_half_life=None)
    for r in train:
        buf.push(r)
    heldout = training_items(held, label_fn, d2t)  # whole records: the context inference sees
    c = drafter.cfg
    log(f"training: {max_steps} steps, batch {batch_size}, window {window}, {ttt_steps} TTT steps, "
        f"{c.num_layers} layer(s), MLP {drafter.layer_cfg.intermediate_size}, draft vocab {len(d2t)}, "
        f"{len(train)} records ({len(held)} held out)")
    metrics = train_drafter(drafter, embed, rope, lambda n, g: buf.training_items(n, label_fn, d2t, g, window),
                            steps=ttt_steps, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed,
                            log=log, time_budget_s=time_budget_s, heldout=heldout)
    drafter.cfg.version = f"offline-{int(time.time())}"
    drafter.save(out_dir)
    log(f"wrote {out_dir}")
    return {**info, **metrics}
