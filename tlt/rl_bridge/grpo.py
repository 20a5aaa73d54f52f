"""GRPO in plain PyTorch, with rollouts from tlt: the trainer behind `tlt demo` and `tlt bench rl`.

One step: P prompts (tasks.py) x n samples each, drawn by the rollout backend with a `sampling_seed` that
is a pure function of (seed, step, prompt index), so that two runs with the same seed and the same
weights draw the same tokens whatever the engine does to go faster. Rewards -> group-normalised
advantages -> the clipped policy-gradient loss, whose importance ratio is taken against the log-probs
the engine returned with the rollouts -> AdamW -> every weight pushed to the engine under its HF name
(`weight_version` = the step number).

Rollout backends, chosen by one flag: `EngineRollouts` (an in-process `tlt.Engine`, driven on this
thread) and `HttpRollouts` (a `tlt serve` process through `HttpClient`). Both report the rollout's
timeline (running sequences over time) and its tail time: the time during which at most
`TAIL_SEQUENCES` sequences were still running and none waited.

The policy is a `transformers` causal LM built from the engine's model config and filled from the
engine's weights by HF name (no checkpoint re-read), trained in float32 (bf16 autocast optional).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from tlt.engine.models.model_config import ModelConfig
from tlt.rl_bridge import tasks

TAIL_SEQUENCES = 8  # "tail": at most this many sequences still running (TLT's long-tail phase)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class GRPOConfig:
    """Hyper-parameters of one GRPO run. Two runs with equal configs draw the same prompts and seeds."""

    steps: int = 6
    prompts_per_step: int = 4
    group_size: int = 8  # n samples per prompt
    max_new_tokens: int = 64
    temperature: float = 0.7
    lr: float = 3e-5
    weight_decay: float = 0.0
    # AdamW's eps at 1e-5 (as PPO's reference implementations), not torch's 1e-8: with 1e-8 its first steps
    # are ~lr * sign(gradient) on every coordinate, so a last-bit difference in the rollout log-probs (a
    # verify pass vs a decode pass) flips near-zero coordinates by 2 * lr and two otherwise identical runs
    # drift apart; with 1e-5 the update is a smooth function of the gradient (measured: max weight
    # difference after one step 1e-7 instead of 4e-5).
    adam_eps: float = 1e-5
    clip_eps: float = 0.2
    minibatches: int = 2  # optimizer steps per RL step (the later ones are off-policy: the ratio clips)
    micro_batch: int = 8  # sequences per forward/backward
    max_grad_norm: float = 1.0
    bf16_autocast: bool = False  # faster on CPUs with bf16 units, but its rounding amplifies last-bit differences
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.prompts_per_step < 1 or self.group_size < 2:
            raise ValueError("steps >= 1, prompts_per_step >= 1 and group_size >= 2 are required")
        if self.minibatches < 1 or self.micro_batch < 1 or self.max_new_tokens < 1:
            raise ValueError("minibatches, micro_batch and max_new_tokens must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (GRPO samples)")


def sampling_seed(seed: int, step: int, prompt_index: int) -> int:
    """The `sampling_seed` of one prompt's group: a pure function of (seed, step, prompt index)."""
    digest = hashlib.blake2b(f"tlt-grpo/{seed}/{step}/{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------- rollouts
@dataclass
class RolloutBatch:
    """What a backend returns for one step: outputs (n per prompt, prompt-major) and timings.

    `timeline`: (seconds since submission, running sequences, waiting requests, arm) after every engine
    step (in-process; arm: the speculative arm of that decode round, 'off' for a plain round of a speculative
    engine, None for a prefill or an engine without a drafter) or every poll (HTTP; arm None).
    """

    outputs: list[dict]
    seconds: float
    timeline: list[tuple[float, int, int, str | None]]
    stats: dict = field(default_factory=dict)  # engine counters over the rollout (in-process only)

    @property
    def tail_seconds(self) -> float:
        return tail_seconds(self.timeline, self.seconds)


def _counter_diff(before: dict, after: dict) -> dict:
    """Numeric engine counters over an interval (nested dicts such as rounds by arm included)."""
    out: dict = {}
    for k, v in after.items():
        b = before.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(b, (int, float)):
            out[k] = v - b
        elif isinstance(v, dict) and isinstance(b, dict) and all(isinstance(x, (int, float)) for x in v.values()):
            out[k] = {a: x - b.get(a, 0) for a, x in v.items() if x != b.get(a, 0)}
    return out


def tail_seconds(timeline: list[tuple[float, int, int, str | None]], total: float) -> float:
    """Time with 1..TAIL_SEQUENCES sequences running and nothing waiting (each sample holds until the next)."""
    out = 0.0
    for i, (t, running, waiting, _) in enumerate(timeline):
        end = timeline[i + 1][0] if i + 1 < len(timeline) else total
        if 0 < running <= TAIL_SEQUENCES and waiting == 0:
            out += max(end - t, 0.0)
    return out


class RolloutBackend(Protocol):
    """How the trainer reaches the engine: rollouts out, weights in."""

    name: str

    def rollout(self, prompts: list[list[int]], params: list[dict]) -> RolloutBatch: ...

    def push_weights(self, named: list[tuple[str, torch.Tensor]], version: str) -> None: ...

    def info(self) -> dict: ...

    def close(self) -> None: ...


class EngineRollouts:
    """An in-process `tlt.Engine`, stepped on the calling thread (one torch thread pool for all work)."""

    name = "engine"

    def __init__(self, engine):
        self.engine = engine

    def rollout(self, prompts: list[list[int]], params: list[dict]) -> RolloutBatch:
        return asyncio.run(self._rollout(prompts, params))

    async def _rollout(self, prompts, params) -> RolloutBatch:
        e = self.engine
        before = e.get_stats()
        t0 = time.perf_counter()
        task = asyncio.ensure_future(e.async_generate(input_ids=prompts, sampling_params=params,
                                                      return_logprob=True))
        timeline: list[tuple[float, int, int, str | None]] = []
        last = before

        def steps(st: dict) -> int:
            return st["num_decode_steps"] + st["num_prefill_batches"]

        # The engine's driver steps once per loop turn; this loop reads the counters between two steps.
        while not task.done():
            s = e.get_stats()
            if steps(s) != steps(last):
                arm = None  # a prefill, or an engine without speculation
                for name, count in s.get("spec_rounds_by_arm", {}).items():
                    if count != last.get("spec_rounds_by_arm", {}).get(name, 0):
                        arm = name
                timeline.append((time.perf_counter() - t0, s["running"], s["waiting"], arm))
                last = s
            await asyncio.sleep(0)
        outs = task.result()
        seconds = time.perf_counter() - t0
        return RolloutBatch(outs if isinstance(outs, list) else [outs], seconds, timeline,
                            _counter_diff(before, e.get_stats()))

    def rollout_without_speculation(self, prompts: list[list[int]], params: list[dict]) -> list[dict]:
        """The same requests with speculation switched off (same weights): the losslessness check."""
        e = self.engine
        spec = e.get_stats().get("speculation")
        if spec is None:
            raise ValueError("this engine does not speculate")
        e.set_speculation("off")
        try:
            return e.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        finally:
            e.set_speculation("adaptive" if spec["mode"] == "adaptive" else spec["fixed_arm"])

    def push_weights(self, named, version: str) -> None:
        self.engine.update_weights_from_tensor(named, weight_version=version)

    def weight(self, name: str) -> torch.Tensor:
        return self.engine.get_weights_by_name(name)

    def info(self) -> dict:
        return _backend_info(self.name, self.engine.get_model_info())

    def close(self) -> None:
        self.engine.shutdown()


def _backend_info(name: str, model_info: dict) -> dict:
    """What the report says about a rollout backend, from its `get_model_info()`."""
    mi = model_info
    return {"backend": name, "speculative": mi.get("drafter_version") is not None,
            "drafter_version": mi.get("drafter_version"), "weight_version": mi.get("weight_version"),
            "dtype": mi.get("dtype")}


class HttpRollouts:
    """A `tlt serve` (or SGLang) server through `HttpClient`; the timeline comes from polling /v1/loads."""

    name = "http"

    def __init__(self, base_url: str, api_key: str | None = None, poll_interval: float = 0.05):
        import httpx

        from tlt.rl_bridge.client import HttpClient

        self.client = HttpClient(base_url, api_key=api_key)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._poll_http = httpx.Client(base_url=base_url, headers=headers, timeout=10.0, trust_env=False)
        self.poll_interval = poll_interval

    def rollout(self, prompts: list[list[int]], params: list[dict]) -> RolloutBatch:
        timeline: list[tuple[float, int, int, str | None]] = []
        done = threading.Event()
        t0 = time.perf_counter()

        def poll():  # HTTP only, no torch: a second thread costs the engine nothing but a loop turn
            while not done.is_set():
                try:
                    load = self._poll_http.get("/v1/loads").json()["loads"][0]
                    timeline.append((time.perf_counter() - t0, int(load["num_running_reqs"]),
                                     int(load["num_waiting_reqs"]), None))
                except Exception:  # noqa: BLE001 - a missed sample only thins the timeline
                    pass
                done.wait(self.poll_interval)

        poller = threading.Thread(target=poll, name="tlt-grpo-poll", daemon=True)
        poller.start()
        try:
            outs = self.client.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        finally:
            done.set()
            poller.join()
        seconds = time.perf_counter() - t0
        return RolloutBatch(outs if isinstance(outs, list) else [outs], seconds, sorted(timeline))

    def push_weights(self, named, version: str) -> None:
        self.client.update_weights_from_tensor(named, weight_version=version)

    def info(self) -> dict:
        return _backend_info(self.name, self.client.get_model_info())

    def close(self) -> None:
        self.client.close()
        self._poll_http.close()


# ---------------------------------------------------------------------------------------------- policy
def hf_config(mc: ModelConfig):
    """A `transformers` config of the engine's architecture (no checkpoint read)."""
    from transformers import AutoConfig

    kw: dict[str, Any] = dict(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps, rope_theta=mc.rope_theta,
        max_position_embeddings=mc.max_position_embeddings, tie_word_embeddings=mc.tie_word_embeddings,
        bos_token_id=mc.bos_token_id, eos_token_id=list(mc.eos_token_ids) or None, hidden_act="silu",
    )
    if mc.rope_scaling:
        kw["rope_scaling"] = dict(mc.rope_scaling, rope_theta=mc.rope_theta)
    if mc.model_type in ("llama", "mistral"):
        kw["attention_bias"] = mc.attention_bias
    return AutoConfig.for_model(mc.model_type, **kw)


def build_policy(mc: ModelConfig, weight: Callable[[str], torch.Tensor]) -> torch.nn.Module:
    """A trainable float32 `transformers` causal LM, every parameter filled by `weight(hf_name)`."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(mc)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():  # every parameter is overwritten below: skip the random init
        policy = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if mc.tie_word_embeddings:
        policy.tie_weights()  # (skipped with the init by some transformers versions)
        if policy.get_output_embeddings().weight is not policy.get_input_embeddings().weight:
            raise RuntimeError("could not tie the policy's LM head to its embedding")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            p.copy_(weight(name).to(torch.float32))
    policy.train()
    return policy


def policy_from_checkpoint(model_path: str | None) -> tuple[torch.nn.Module, ModelConfig]:
    """The policy from a checkpoint read by tlt's own loader (HTTP mode: the engine is elsewhere)."""
    from tlt.engine.models.weights import iter_checkpoint, load_hf_config, resolve_checkpoint

    kind, path = resolve_checkpoint(model_path)
    hf = load_hf_config(kind, path)
    mc = ModelConfig.from_hf(hf)
    tensors = dict(iter_checkpoint(kind, path, hf))
    if mc.tie_word_embeddings:
        tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])
    return build_policy(mc, tensors.__getitem__), mc


def named_weights(policy: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter under its HF name (a tied LM head once, as the embedding)."""
    return [(n, p.detach()) for n, p in policy.named_parameters()]


# ---------------------------------------------------------------------------------------------- GRPO math
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """rewards [G * n] (group-major) -> (r - group mean) / (group std + eps), std over the group (1/n).

    A group whose rewards are all equal gets advantage 0 (no signal, no gradient).
    """
    r = rewards.view(-1, group_size).float()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1)


def clipped_pg_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float, denominator: int | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, GRPO's aggregation: mean over each sequence's tokens, then over sequences.

    new_lp, old_lp, mask [B, T] (old_lp: the rollout's log-probs; mask: real completion tokens), adv [B].
    Per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) with ratio = exp(new_lp - old_lp).
    `denominator`: sequences the mean is over (default B; larger when some sequences of the minibatch are
    left out because their advantage is 0, which keeps the gradient scale of the whole minibatch).
    """
    mask = mask.to(new_lp.dtype)
    ratio = torch.exp(new_lp - old_lp)  # [B, T]
    a = adv.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    lens = mask.sum(dim=1).clamp(min=1)
    per_seq = -(surrogate * mask).sum(dim=1) / lens  # [B]
    loss = per_seq.sum() / (denominator or len(per_seq))
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).to(mask.dtype) * mask
        stats = {"clip_tokens": float(clipped.sum()), "tokens": float(mask.sum()),
                 "abs_log_ratio_sum": float(((new_lp - old_lp).abs() * mask).sum())}
    return loss, stats


def completion_logprobs(policy: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]],
                        temperature: float, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each completion token under `policy` at `temperature` (as the engine reports them:
    after temperature, before top-k/top-p) -> (logprobs [B, Tc] float32, mask [B, Tc]).

    Sequences are right-padded, so positions equal the engine's; the LM head runs only where a
    completion token is predicted. When every sequence has the same prompt (the samples of one GRPO
    group), the prompt runs once and the completions attend to its KV cache (gradients flow through it).
    """
    dev = next(policy.parameters()).device
    B = len(prompts)
    Tc = max(len(c) for c in completions)
    shared = B > 1 and all(p == prompts[0] for p in prompts)
    dec = policy.get_decoder()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        if shared:
            P = len(prompts[0])
            pre = dec(input_ids=torch.tensor([prompts[0]], device=dev), use_cache=True)
            cache = pre.past_key_values
            cache.batch_repeat_interleave(B)
            ids = torch.zeros((B, Tc), dtype=torch.long, device=dev)
            attn = torch.zeros((B, P + Tc), dtype=torch.long, device=dev)
            attn[:, :P] = 1
            for b, c in enumerate(completions):
                ids[b, : len(c)] = torch.tensor(c, device=dev)
                attn[b, P : P + len(c)] = 1
            out = dec(input_ids=ids, attention_mask=attn, past_key_values=cache, use_cache=True)
            # Completion token 0 is predicted by the prompt's last position, token t by completion position t-1.
            hidden = torch.cat([pre.last_hidden_state[:, P - 1 :].expand(B, 1, -1),
                                out.last_hidden_state[:, : Tc - 1]], dim=1)  # [B, Tc, H]
            cols = [list(range(len(c))) for c in completions]
        else:
            seqs = [p + c for p, c in zip(prompts, completions)]
            T = max(len(x) for x in seqs)
            ids = torch.zeros((B, T), dtype=torch.long, device=dev)
            attn = torch.zeros((B, T), dtype=torch.long, device=dev)
            for b, x in enumerate(seqs):
                ids[b, : len(x)] = torch.tensor(x, device=dev)
                attn[b, : len(x)] = 1
            hidden = dec(input_ids=ids, attention_mask=attn if bool((attn == 0).any()) else None).last_hidden_state
            cols = [[len(p) + t - 1 for t in range(len(c))] for p, c in zip(prompts, completions)]
        rows = torch.tensor([b for b, c in enumerate(cols) for _ in c], device=dev)
        pos = torch.tensor([t for c in cols for t in c], device=dev)
        logits = policy.get_output_embeddings()(hidden[rows, pos])  # [N, V], N = completion tokens
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    targets = torch.tensor([t for c in completions for t in c], device=dev)
    chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1)  # [N]
    out_t = torch.tensor([t for c in completions for t in range(len(c))], device=dev)
    logprobs = torch.zeros((B, Tc), dtype=torch.float32, device=dev).index_put((rows, out_t), chosen)
    mask = torch.zeros((B, Tc), dtype=torch.bool, device=dev)
    mask[rows, out_t] = True
    return logprobs, mask


# ---------------------------------------------------------------------------------------------- drafter
@dataclass
class DrafterBudget:
    """Seconds of drafter training allowed after each rollout (see `OnlineDrafterHook`)."""

    mode: str  # "fixed" | "earned"
    max_s: float  # fixed: every step's allowance; earned: the most one step may spend (and bank)
    min_s: float = 1.0  # earned: train only once this much is banked
    banked_s: float = 0.0  # earned: speculation's savings not yet spent (negative: a loss to pay back)

    MODES = ("fixed", "earned")

    def __post_init__(self):
        if self.mode not in self.MODES:
            raise ValueError(f"drafter budget must be one of {self.MODES}, got {self.mode!r}")
        if self.max_s < 0 or self.min_s < 0:
            raise ValueError("drafter budget seconds must be >= 0")

    def allowance(self, saved_s: float) -> float:
        """Seconds to train after a rollout in which speculation saved `saved_s` (negative: lost)."""
        if self.mode == "fixed":
            return self.max_s
        self.banked_s = min(self.banked_s + saved_s, self.max_s)
        return self.banked_s if self.banked_s > 0 and self.banked_s >= self.min_s else 0.0

    def spend(self, seconds: float) -> None:
        if self.mode == "earned":
            self.banked_s -= seconds


class OnlineDrafterHook:
    """The online drafter (`tlt.drafter_sync.OnlineDrafter`) in a GRPO step: it collects the engine's
    rollout states, trains after each rollout and publishes a new drafter version into the engine; after the
    policy push, data of the old policy is aged out.

    How long it trains (`budget`):
    - "fixed": `budget_s` seconds after every rollout. Right where the hardware is otherwise idle then (TLT's
      spot trainer on a GPU cluster's long tail), but on one machine that time is taken from the step.
    - "earned": only the time speculation saved in the rollouts so far (the engine's `spec_seconds_saved`:
      speculative rounds against plain decoding's round time at the same batch size), at most `budget_s` per
      step; savings not spent carry over, and a step trains only once `min_s` seconds are banked (a
      shorter run is mostly the publish gate's fixed cost). So the drafter never costs the run more than
      speculation gained: the budget for a machine with no idle hardware.

    A version is published only if it does at least as well as the serving one on a quarter of the step's
    rollouts kept out of training (`holdout_every=4`): a few seconds of training on one step's rollouts
    can make a good offline drafter worse (measured: accept length 2.01 -> 1.66)."""

    def __init__(self, engine, budget_s: float, budget: str = "fixed", min_s: float = 1.0, **online_kwargs):
        from tlt.drafter_sync import OnlineDrafter

        self.budget = DrafterBudget(budget, budget_s, min_s)
        online_kwargs.setdefault("holdout_every", 4)
        self.online = OnlineDrafter(engine, **online_kwargs)

    def after_rollout(self, saved_s: float = 0.0) -> dict:
        """Train (and maybe publish) after a rollout in which speculation saved `saved_s` seconds."""
        t = time.perf_counter()
        allowed = self.budget.allowance(saved_s)
        res = self.online.train_idle(time_budget_s=allowed) if allowed > 0 else {}
        spent = time.perf_counter() - t
        self.budget.spend(spent)
        return {"seconds": spent, "steps": res.get("steps", 0), "published": res.get("published"),
                "sink_s": self.online.sink_time_s, "gate": self.online.last_gate, "allowed_s": allowed,
                "saved_s": saved_s, "banked_s": self.budget.banked_s}

    def after_push(self, weight_version: str) -> float:
        t = time.perf_counter()
        self.online.on_policy_update(weight_version)
        return time.perf_counter() - t

    def close(self) -> None:
        self.online.close()


# ---------------------------------------------------------------------------------------------- trainer
@dataclass
class StepRecord:
    """What one GRPO step did and how long each part took."""

    step: int
    reward_mean: float
    rewards: list[float]
    rollout_s: float
    tail_s: float
    train_s: float
    push_s: float
    drafter_s: float
    tokens: int
    mean_response_len: float
    accept_len: float | None
    drafter_version: str | None
    weight_version: str | None  # the weights that drew this step's rollouts
    loss: float
    clip_frac: float
    mean_abs_log_ratio: float  # |policy - engine| log-prob at the first minibatch: numerics, not drift
    trained_seqs: int
    timeline: list[tuple[float, int, int, str | None]]
    output_ids: list[list[int]]
    output_logprobs: list[list[float]]
    arm_stats: dict  # engine counters of the rollout: rounds, tokens and seconds by arm
    drafter_train: dict  # the online drafter's spot training after this rollout (steps, published version)
    lossless_check: dict | None  # the rollout replayed without speculation at the same weights (untimed)

    @property
    def step_s(self) -> float:
        return self.rollout_s + self.train_s + self.push_s + self.drafter_s

    def summary(self) -> dict:
        """JSON-ready, without the bulky fields."""
        d = asdict(self)
        for k in ("timeline", "output_ids", "output_logprobs"):
            d.pop(k)
        d["step_s"] = self.step_s
        return d


class GRPOTrainer:
    """GRPO over a rollout backend. `run()` does `cfg.steps` steps; `step(k)` one (k from 1)."""

    def __init__(self, backend: RolloutBackend, policy: torch.nn.Module, tokenizer, cfg: GRPOConfig,
                 label: str = "", log: Callable[[str], None] = print, drafter: OnlineDrafterHook | None = None,
                 reward_fn: Callable[[dict, tasks.Problem], float] | None = None, lossless_check: bool = False):
        self.backend = backend
        self.policy = policy
        self.cfg = cfg
        self.label = label
        self.log = log
        self.drafter = drafter
        # After each rollout (and the drafter's training), replay it with speculation off on the same weights
        # and compare tokens; untimed. Needs a backend with `rollout_without_speculation`.
        self.lossless_check = lossless_check
        if lossless_check and not hasattr(backend, "rollout_without_speculation"):
            raise ValueError(f"the {backend.name} backend cannot replay without speculation")
        self.reward_fn = reward_fn or (lambda out, problem: tasks.reward(out["text"], problem.answer))
        self.problems = tasks.make_problems(cfg.steps * cfg.prompts_per_step, cfg.seed)
        self.prompts = [tasks.prompt_ids(tokenizer, p) for p in self.problems]
        self.opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self.records: list[StepRecord] = []

    def step_prompts(self, step: int) -> tuple[list[tasks.Problem], list[list[int]], list[dict]]:
        """The problems, prompt ids and sampling params of step `step` (1-based)."""
        c = self.cfg
        lo = (step - 1) * c.prompts_per_step
        probs = self.problems[lo : lo + c.prompts_per_step]
        ids = self.prompts[lo : lo + c.prompts_per_step]
        params = [{"temperature": c.temperature, "max_new_tokens": c.max_new_tokens, "n": c.group_size,
                   "sampling_seed": sampling_seed(c.seed, step, i)} for i in range(len(ids))]
        return probs, ids, params

    def run(self, max_steps: int | None = None, time_budget_s: float | None = None) -> list[StepRecord]:
        """Steps 1.. until `cfg.steps`, `max_steps`, or (after the first) until the next step would likely end
        past `time_budget_s` (judged by the mean step time so far)."""
        t0 = time.perf_counter()
        last = min(self.cfg.steps, max_steps or self.cfg.steps)
        for k in range(1, last + 1):
            if time_budget_s is not None and self.records:
                elapsed = time.perf_counter() - t0
                if elapsed + elapsed / len(self.records) > time_budget_s:
                    self.log(f"[{self.label}] time budget: stopping after {len(self.records)} steps")
                    break
            self.step(k)
        return self.records

    def step(self, step: int) -> StepRecord:
        c = self.cfg
        probs, ids, params = self.step_prompts(step)
        batch = self.backend.rollout(ids, params)
        outs = batch.outputs
        n = c.group_size
        if len(outs) != len(ids) * n:
            raise RuntimeError(f"rollout returned {len(outs)} outputs, expected {len(ids) * n}")
        rewards = [float(self.reward_fn(o, probs[i // n])) for i, o in enumerate(outs)]
        # The drafter trains on this rollout before the policy moves: its labels are the rollout policy's.
        drafter = ({"seconds": 0.0} if self.drafter is None else
                   self.drafter.after_rollout(batch.stats.get("spec_seconds_saved", 0.0)))
        check = self._check(ids, params, outs) if self.lossless_check else None

        t = time.perf_counter()
        train = self._train(ids, outs, torch.tensor(rewards), step)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        self.backend.push_weights(named_weights(self.policy), version=str(step))
        push_s = time.perf_counter() - t
        if self.drafter is not None:
            drafter["seconds"] += self.drafter.after_push(str(step))

        metas = [o["meta_info"] for o in outs]
        rounds = sum(m.get("spec_verify_ct", 0) for m in metas)
        accepted = sum(m.get("spec_accept_token_num", 0) for m in metas)
        rec = StepRecord(
            step=step, reward_mean=sum(rewards) / len(rewards), rewards=rewards, rollout_s=batch.seconds,
            tail_s=batch.tail_seconds, train_s=train_s, push_s=push_s, drafter_s=drafter["seconds"],
            tokens=sum(len(o["output_ids"]) for o in outs),
            mean_response_len=sum(len(o["output_ids"]) for o in outs) / len(outs),
            accept_len=(accepted / rounds + 1) if rounds else None,
            drafter_version=metas[0].get("drafter_version"), weight_version=metas[0].get("weight_version"),
            loss=train["loss"], clip_frac=train["clip_frac"], mean_abs_log_ratio=train["mean_abs_log_ratio"],
            trained_seqs=train["trained_seqs"], timeline=batch.timeline,
            output_ids=[list(o["output_ids"]) for o in outs],
            output_logprobs=[[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in outs],
            arm_stats={k: v for k, v in batch.stats.items() if k.startswith(("spec_", "num_decode"))},
            drafter_train={k: v for k, v in drafter.items() if k != "seconds"}, lossless_check=check,
        )
        self.records.append(rec)
        self.log(self._line(rec))
        return rec

    def _check(self, ids, params, outs) -> dict:
        t = time.perf_counter()
        ref = self.backend.rollout_without_speculation(ids, params)
        first = next(({"sequence": i, "position": next((j for j, (u, v) in enumerate(zip(a, b)) if u != v),
                                                        min(len(a), len(b)))}
                      for i, (a, b) in enumerate((o["output_ids"], r["output_ids"]) for o, r in zip(outs, ref))
                      if a != b), None)
        lp = max((abs(x[0] - y[0]) for o, r in zip(outs, ref) if o["output_ids"] == r["output_ids"]
                  for x, y in zip(o["meta_info"]["output_token_logprobs"], r["meta_info"]["output_token_logprobs"])),
                 default=0.0)
        return {"identical": first is None, "first_difference": first, "max_logprob_diff": lp,
                "seconds": time.perf_counter() - t}

    def _line(self, r: StepRecord) -> str:
        """The per-step progress line."""
        acc = f"accept {r.accept_len:.2f}" if r.accept_len is not None else "accept   -  "
        tag = f"[{self.label}] " if self.label else ""
        return (f"{tag}step {r.step}/{self.cfg.steps}  reward {r.reward_mean:.3f}  rollout {r.rollout_s:5.1f} s "
                f"(tail {r.tail_s:4.1f} s)  train {r.train_s:5.1f} s  push {r.push_s:.1f} s  "
                f"{r.tokens} tok  {acc}  arms {_arm_mix(r.arm_stats)}  drafter {r.drafter_version or '-'}"
                + (f" (trained {r.drafter_s:.1f} s, saved {r.drafter_train['saved_s']:+.1f} s)"
                   if "saved_s" in r.drafter_train else "")
                + f"  loss {r.loss:+.4f}  "
                f"clip {r.clip_frac:.3f}"
                + ("" if r.lossless_check is None else
                   f"  replay without spec: {'identical' if r.lossless_check['identical'] else 'DIFFERENT'}"))

    def _train(self, prompts: list[list[int]], outs: list[dict], rewards: torch.Tensor, step: int) -> dict:
        """One RL step's optimisation: `minibatches` AdamW steps over the step's sequences."""
        c = self.cfg
        n = c.group_size
        adv = group_advantages(rewards, n)
        items = []
        for i, o in enumerate(outs):
            lps = [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]
            if len(lps) != len(o["output_ids"]) or any(lp is None for lp in lps):
                raise RuntimeError("rollout log-probs do not cover every output token")
            items.append((prompts[i // n], list(o["output_ids"]), lps, float(adv[i]), i // n))
        order = list(range(len(items)))
        random.Random(f"tlt-grpo-mb/{c.seed}/{step}").shuffle(order)
        chunks = [order[j :: c.minibatches] for j in range(c.minibatches)]
        total_loss, clip_tokens, tokens, trained = 0.0, 0.0, 0.0, 0
        first_abs, first_tokens = 0.0, 0.0  # the first trained minibatch: policy == rollout weights
        for chunk in chunks:
            # Sequences with advantage 0 add nothing to the loss or its gradient: skip their forward pass,
            # but keep them in the denominator.
            live = [j for j in chunk if items[j][3] != 0.0 and items[j][1]]
            if not live:
                continue
            # Micro-batches of one group each (its prompt then runs once), at most `micro_batch` sequences.
            parts = []
            for g in sorted({items[j][4] for j in live}):
                members = [j for j in live if items[j][4] == g]
                parts += [members[lo : lo + c.micro_batch] for lo in range(0, len(members), c.micro_batch)]
            self.opt.zero_grad(set_to_none=True)
            for members in parts:
                part = [items[j] for j in members]
                new_lp, mask = completion_logprobs(self.policy, [x[0] for x in part], [x[1] for x in part],
                                                   c.temperature, c.bf16_autocast)
                old = torch.zeros_like(new_lp)
                for b, x in enumerate(part):
                    old[b, : len(x[2])] = torch.tensor(x[2], dtype=torch.float32)
                adv_t = torch.tensor([x[3] for x in part], device=new_lp.device)
                loss, st = clipped_pg_loss(new_lp, old, adv_t, mask, c.clip_eps, denominator=len(chunk))
                loss.backward()
                total_loss += float(loss.detach())
                clip_tokens += st["clip_tokens"]
                tokens += st["tokens"]
                if trained == 0:
                    first_abs += st["abs_log_ratio_sum"]
                    first_tokens += st["tokens"]
            trained += len(live)
            grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
            if not math.isfinite(float(norm)) or not grads:
                self.log(f"[{self.label}] step {step}: non-finite gradient, optimizer step skipped")
                continue
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": total_loss, "clip_frac": clip_tokens / max(tokens, 1.0), "trained_seqs": trained,
                "mean_abs_log_ratio": first_abs / max(first_tokens, 1.0)}


# ---------------------------------------------------------------------------------------------- comparison
def compare_rollouts(a: list[StepRecord], b: list[StepRecord], group_size: int, tokenizer=None,
                     dtype: str = "float32", deterministic: bool = False) -> list[dict]:
    """Per step: are two runs' rollouts token-identical? If not, where they first differ, and why.

    With the same seed, the same weights and a lossless engine the rollouts are identical. Each step also
    reports the largest difference between the two runs' log-probs of identical sequences: speculation
    computes them in a verify pass (several tokens per row), plain decoding one token per row, so they
    may differ in the last bits. The importance ratio uses them, and AdamW normalises every coordinate of
    the gradient (its first steps are about lr * sign(gradient)), so even such a difference gives slightly
    different weights after that step, and a sampled token that was nearly tied can flip later.

    The reason given for a step's first difference: `weights differ (...)` when an earlier step's
    training inputs differed (tokens, rewards, or log-probs); at identical weights, `rounding (bfloat16)`
    for a 16-bit engine (verify and decode round differently, a nearly tied draw can flip); else
    `not lossless` (float32, or engines with `enable_deterministic_inference` (`deterministic`), whose bf16
    passes are batch-invariant: identical weights, another token is a bug).
    """
    out = []
    cause: str | None = None  # why the weights may differ from this step on
    for ra, rb in zip(a, b):
        diffs = []
        lp_diff = 0.0
        for i, (x, y) in enumerate(zip(ra.output_ids, rb.output_ids)):
            la, lb = ra.output_logprobs[i], rb.output_logprobs[i]
            if x == y:
                lp_diff = max([lp_diff] + [abs(u - v) for u, v in zip(la, lb)])
                continue
            pos = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            d: dict[str, Any] = {"prompt": i // group_size, "sample": i % group_size, "position": pos,
                                 "token_a": x[pos] if pos < len(x) else None,
                                 "token_b": y[pos] if pos < len(y) else None, "len_a": len(x), "len_b": len(y),
                                 "logprob_a": la[pos] if pos < len(la) else None,
                                 "logprob_b": lb[pos] if pos < len(lb) else None}
            if tokenizer is not None:
                d["text_a"] = tokenizer.decode(x[pos : pos + 8]) if pos < len(x) else "<end>"
                d["text_b"] = tokenizer.decode(y[pos : pos + 8]) if pos < len(y) else "<end>"
            if cause is not None:
                d["reason"] = f"weights differ ({cause})"
            elif dtype in ("bfloat16", "float16") and not deterministic:
                d["reason"] = f"rounding ({dtype})"
            else:
                d["reason"] = "not lossless"
            diffs.append(d)
        identical = not diffs and len(ra.output_ids) == len(rb.output_ids)
        same_rewards = ra.rewards == rb.rewards
        out.append({"step": ra.step, "identical": identical, "sequences": len(ra.output_ids),
                    "differing_sequences": len(diffs), "first_difference": diffs[0] if diffs else None,
                    "same_rewards": same_rewards, "max_logprob_diff": lp_diff, "same_weights": cause is None})
        if cause is None:
            if not identical or not same_rewards:
                cause = f"step {ra.step} trained on other rollouts"
            elif lp_diff > 0:
                cause = f"step {ra.step}'s rollout log-probs differed by up to {lp_diff:.1e}"
    return out


def _arm_mix(arm_stats: dict) -> str:
    """Share of decode rounds per arm, e.g. 'plain 62% s3k1n4 38%' ('-' without speculation stats)."""
    rounds = arm_stats.get("spec_rounds_by_arm") or {}
    total = sum(rounds.values())
    if not total:
        return "-"
    return " ".join(f"{name} {100 * n / total:.0f}%" for name, n in sorted(rounds.items(), key=lambda kv: -kv[1]))
