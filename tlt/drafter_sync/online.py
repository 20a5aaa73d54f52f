"""The online drafter loop in one object: rollout data in, spot training in idle time, new versions out.

The parts live beside this file (buffer, spot trainer, publisher); a user of tlt should not have to wire
them. `OnlineDrafter` attaches the data sink to every engine, so finished rollouts feed the buffer with
states the engines computed anyway; `train_idle` lends it idle compute and hands the result to the
engines; `on_policy_update` is the one call a trainer adds after pushing new policy weights, because
the drafter's data and its target changed with them.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable

import torch

from tlt.drafter_sync.buffer import DrafterDataBuffer, HeadLabels
from tlt.drafter_sync.publish import DrafterPublisher
from tlt.drafter_sync.trainer import SpotTrainer
from tlt.drafter_sync.training import DrafterTrainer, TrainerConfig, evaluate_items, expected_tokens
from tlt.engine.models.rope import RotaryTable
from tlt.engine.spec.drafter import EagleDrafter

logger = logging.getLogger(__name__)


class OnlineDrafter:
    """Keeps a drafter aligned with a changing policy, training only when told the hardware is idle.

    `engines`: one engine or a list serving the same policy; all feed data, those with a drafter get each
    published version. The first is the label source: its LM head turns stored hidden states into the
    target's distributions, and its embedding is the drafter's input embedding.
    `drafter`: where training starts — None (a float32 copy of the first speculative engine's current
    drafter), a drafter folder, or an `EagleDrafter`.
    `keep_versions`: policy versions whose data stays in the buffer after `on_policy_update`; 1 trains only
    on data of the policy being served, whose labels the current LM head gives exactly.
    `batch_size` x `window`: sequences x positions per spot step; smaller steps yield sooner.
    `out_dir`: published versions are also written there as servable folders.
    `holdout_every`: every n-th record is kept out of training, for the publish gate: a new version is
    delivered only if its expected tokens per round (from top-1 agreement with the target per draft depth)
    on held-out records of the current policy is at least the serving version's. 0: no gate.
    """

    def __init__(self, engines, drafter: EagleDrafter | str | None = None, *, capacity_bytes: int = 512 << 20,
                 keep_versions: int = 1, batch_size: int = 8, window: int = 96, lr: float = 1e-3,
                 ttt_steps: int = 3, warmup_steps: int | None = None, recency_half_life: float | None = 256.0,
                 out_dir: str | None = None, prefix: str = "online", seed: int = 0, holdout_every: int = 0,
                 holdout_records: int = 8):
        self.engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
        if not self.engines:
            raise ValueError("OnlineDrafter needs at least one engine")
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        if holdout_every < 0 or holdout_records < 1:
            raise ValueError("holdout_every must be >= 0 and holdout_records >= 1")
        source = self.engines[0]
        mc = source.model_config
        if any(e.model_config.hidden_size != mc.hidden_size or e.model_config.vocab_size != mc.vocab_size
               for e in self.engines):
            raise ValueError("the engines serve models of different shapes")
        self.source = source
        self.keep_versions = keep_versions
        dev = source.device
        start = self._starting_drafter(drafter)
        start = start.to(device=dev, dtype=torch.float32).requires_grad_(True)
        # A copy, refreshed on every policy update: training must not see the engine's weights change mid-step.
        self.embed = torch.nn.Embedding.from_pretrained(source.model.embed.weight.detach().float().clone(),
                                                        freeze=True)
        rope = RotaryTable(mc.head_dim, mc.rope_theta, mc.rope_scaling, window + 8, dev, torch.float32)
        trainer = DrafterTrainer(start, self.embed, rope,
                                 TrainerConfig(ttt_steps=ttt_steps, lr=lr, warmup_steps=warmup_steps))
        self.buffer = DrafterDataBuffer(capacity_bytes, hidden_size=mc.hidden_size,
                                        recency_half_life=recency_half_life)
        self._labels = HeadLabels(lambda: self.source.model.head_weight)
        self.spot = SpotTrainer(trainer, self.buffer, self._labels, batch_size=batch_size, window=window, seed=seed)
        # The gate's reference: what the engines serve now (the starting drafter until the first publish).
        self._serving = copy.deepcopy(start).eval().requires_grad_(False)
        self.holdout_every, self.holdout_records, self.window, self.seed = holdout_every, holdout_records, window, seed
        self.holdout = DrafterDataBuffer(max(capacity_bytes // 8, 1 << 20), hidden_size=mc.hidden_size,
                                         recency_half_life=None)
        self._records_seen = 0
        self.gate_rejections = 0
        self.last_gate: dict | None = None
        self.publish_time_s = 0.0  # the last publish's cost (gate included): reserved in train_idle's budget
        self.publisher = DrafterPublisher(self.spot, [e for e in self.engines if e.spec is not None],
                                          out_dir=out_dir, prefix=prefix)
        self.sink_time_s = 0.0  # time rollouts spent handing data over: the data path's cost to them
        self._sink_lock = threading.Lock()
        for e in self.engines:
            e.set_drafter_data_sink(self._sink)

    def _starting_drafter(self, drafter) -> EagleDrafter:
        if isinstance(drafter, EagleDrafter):
            return drafter.unpacked_copy()
        if isinstance(drafter, str):
            return EagleDrafter.load(drafter, self.source.model_config)
        if drafter is not None:
            raise TypeError(f"drafter must be None, a folder or an EagleDrafter, not {type(drafter).__name__}")
        serving = next((e.spec.drafter for e in self.engines if e.spec is not None), None)
        if serving is None:
            raise ValueError("no drafter to start from: give a drafter folder, or an engine with "
                             "speculative_draft_model_path")
        return serving.unpacked_copy()

    def _sink(self, record: dict) -> None:
        # Runs on an engine's loop, inside a rollout: only the copy into the buffer, timed.
        t0 = time.perf_counter()
        try:
            with self._sink_lock:
                self._records_seen += 1
                held_out = self.holdout_every and self._records_seen % self.holdout_every == 0
            (self.holdout if held_out else self.buffer).push(record)
        finally:
            with self._sink_lock:
                self.sink_time_s += time.perf_counter() - t0

    @property
    def drafter(self) -> EagleDrafter:
        """The drafter being trained (engines serve published copies of it)."""
        return self.spot.drafter

    @property
    def version(self) -> str | None:
        """The last published version, None before the first."""
        return self.publisher.version

    def train_idle(self, should_yield: Callable[[], bool] | None = None, *, time_budget_s: float | None = None,
                   max_steps: int | None = None, publish: bool = True, poll_interval_s: float = 0.002) -> dict:
        """Spot steps until `should_yield()` is True (asked before every step, so rollout work waits at most one
        step), `time_budget_s` would pass (the publish included: the last publish's cost is kept free, and no
        step starts that would likely end past it), `max_steps` were tried or the buffer is empty; then publish
        if any step succeeded. Returns {"steps", "bad_steps", "elapsed_s", "stopped", "published": version or None,
        "preemption_latency_s": from should_yield() turning True to the return, None if it never did}.

        To time the preemption, a helper thread also polls `should_yield` every `poll_interval_s` while a
        step runs (the step itself cannot look): it must be cheap and thread-safe, e.g. read a flag."""
        flipped: list[float] = []
        done = threading.Event()

        def seen() -> bool:
            if flipped:
                return True
            if should_yield is not None and should_yield():
                flipped.append(time.perf_counter())
                return True
            return False

        def watch() -> None:
            while not done.wait(poll_interval_s):
                if seen():
                    return

        watcher = threading.Thread(target=watch, name="tlt-yield-watch", daemon=True) if should_yield else None
        if watcher is not None:
            watcher.start()
        try:
            # The publish (gate and delivery) comes out of the budget too: its last measured cost is reserved.
            reserve = self.publish_time_s if publish else 0.0
            train_budget = None if time_budget_s is None else time_budget_s - reserve
            res = self.spot.run(seen, max_steps=max_steps, time_budget_s=train_budget)
            res["published"] = self.publish() if publish and res["steps"] else None
        finally:
            done.set()
            if watcher is not None:
                watcher.join()
        end = time.perf_counter()
        res["preemption_latency_s"] = end - flipped[0] if flipped else None
        return res

    def publish(self) -> str | None:
        """Deliver the drafter as a new version to the engines now; the version, or None (nothing new, the last
        step failed, or the gate found it worse than the serving version on held-out records)."""
        t0 = time.perf_counter()
        try:
            if self.holdout_every and len(self.holdout) and self.publisher.published_step != self.spot.steps:
                items = self._holdout_items()  # one sample and one set of labels for both drafters
                cand, serving = self.evaluate(self.spot.drafter, items), self.evaluate(self._serving, items)
                self.last_gate = {"candidate": cand, "serving": serving, "step": self.spot.steps}
                if cand < serving:
                    self.gate_rejections += 1
                    logger.info("drafter at step %d not published: %.3f expected tokens per round on held-out "
                                "records vs %.3f for the serving version", self.spot.steps, cand, serving)
                    return None
            version = self.publisher.publish()
            if version is not None:
                self._serving = copy.deepcopy(self.spot.drafter).eval().requires_grad_(False)
            return version
        finally:
            self.publish_time_s = time.perf_counter() - t0

    def _holdout_items(self) -> list[dict]:
        return self.holdout.training_items(self.holdout_records, self._labels, self.spot.drafter.d2t,
                                           torch.Generator().manual_seed(self.seed), self.window)

    @torch.no_grad()
    def evaluate(self, drafter: EagleDrafter, items: list[dict] | None = None) -> float:
        """Expected tokens per chain round on the held-out records (the same sample for every drafter):
        1 + a1 + a1*a2 + ..., a_k = top-1 agreement with the target at draft depth k (training-time test).
        `items`: from `_holdout_items()` (labels over the training drafter's vocabulary), to share them."""
        if items is None or not torch.equal(drafter.d2t.cpu(), self.spot.drafter.d2t.cpu()):
            items = self.holdout.training_items(self.holdout_records, self._labels, drafter.d2t,
                                                torch.Generator().manual_seed(self.seed), self.window)
        if not items:
            return 0.0
        trainer = self.spot.trainer
        accs = evaluate_items(drafter, trainer.embed, trainer.rope, items, trainer.config.ttt_steps)
        return expected_tokens(accs)

    def on_policy_update(self, weight_version: str | None = None) -> dict:
        """Call after new policy weights reached the engines (`weight_version`: theirs; default: the source
        engine's). Drops buffered data of all but the `keep_versions` newest policies, and refreshes the
        drafter's copy of the target embedding (labels read the engine's LM head live). The drafter itself
        keeps training from where it is: the new policy is close to the old one."""
        version = str(weight_version if weight_version is not None else self.source.weight_version)
        dropped = self.buffer.age_out(version, self.keep_versions)
        self.holdout.age_out(version, 1)  # the gate compares drafters on the policy being served
        with torch.no_grad():
            self.embed.weight.copy_(self.source.model.embed.weight.float())
        return {"weight_version": version, "aged_out": dropped, "records": len(self.buffer)}

    def stats(self) -> dict:
        """The buffer's and the trainer's stats, the published version and the rollouts' data-path time."""
        return {"buffer": self.buffer.stats(), "trainer": self.spot.stats(), "version": self.version,
                "publish_failures": self.publisher.failures, "sink_time_s": self.sink_time_s,
                "holdout_records": len(self.holdout), "gate_rejections": self.gate_rejections,
                "last_gate": self.last_gate}

    def close(self) -> None:
        """Detach the data sinks (the engines stop keeping last hidden states for the drafter)."""
        for e in self.engines:
            e.set_drafter_data_sink(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
