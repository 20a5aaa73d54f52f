"""Spot training of the drafter: steps that run only while the hardware would otherwise idle.

The caller (a rollout worker that finished its share, the long tail's gaps) lends compute with
`run(should_yield)`; the trainer asks before every step, so rollout work waits at most one step. Stopping
loses nothing: the optimizer state stays in memory between calls, and `checkpoint` writes it to disk
atomically for a process that may be killed. A step that fails (non-finite loss or gradient, any
exception) is rolled back to the last good state, so bad data or a crash never reaches a published drafter.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable

import torch

from tlt.drafter_sync.buffer import DrafterDataBuffer
from tlt.drafter_sync.training import DrafterTrainer, TrainerConfig
from tlt.engine.models.model_config import ModelConfig
from tlt.engine.spec.drafter import DrafterConfig, EagleDrafter

logger = logging.getLogger("tlt.drafter")

CHECKPOINT_FILE = "spot_trainer.pt"
CHECKPOINT_FORMAT = "tlt-spot-trainer-v1"


def _clone_into(dst, src):
    """A copy of the nested state `src`, reusing `dst`'s tensors where shapes match (no allocation per step)."""
    if isinstance(src, torch.Tensor):
        if (isinstance(dst, torch.Tensor) and dst.shape == src.shape and dst.dtype == src.dtype
                and dst.device == src.device):
            return dst.copy_(src)
        return src.detach().clone()
    if isinstance(src, dict):
        old = dst if isinstance(dst, dict) else {}
        return {k: _clone_into(old.get(k), v) for k, v in src.items()}
    if isinstance(src, (list, tuple)):
        old = dst if isinstance(dst, (list, tuple)) and len(dst) == len(src) else [None] * len(src)
        return type(src)(_clone_into(a, b) for a, b in zip(old, src))
    return copy.deepcopy(src)


class SpotTrainer:
    """A `DrafterTrainer` fed from a `DrafterDataBuffer`, preemptible between steps and safe against bad steps.

    `label_fn`: the target's LM head on stored last hidden states (see `DrafterDataBuffer.training_items`).
    Owns its drafter: engines get copies through `DrafterPublisher`."""

    def __init__(self, trainer: DrafterTrainer, buffer: DrafterDataBuffer,
                 label_fn: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int = 8, window: int = 96,
                 seed: int = 0, max_consecutive_bad: int = 8):
        if batch_size < 1 or window < 2 or max_consecutive_bad < 1:
            raise ValueError("batch_size, max_consecutive_bad must be >= 1 and window >= 2")
        self.trainer, self.buffer, self.label_fn = trainer, buffer, label_fn
        self.batch_size, self.window = batch_size, window
        self.max_consecutive_bad = max_consecutive_bad
        self.generator = torch.Generator().manual_seed(seed)
        self.bad_steps = 0
        self.consecutive_bad = 0
        self.train_time_s = 0.0
        self.last_step_s = 0.0  # the last step's wall time (run() starts no step expected to overrun its budget)
        self.last_loss: float | None = None
        self.last_acc: list[float] = []
        self.last_step_ok = True
        self.last_error: str | None = None
        self._good = _clone_into(None, trainer.state_dict())

    @property
    def drafter(self) -> EagleDrafter:
        return self.trainer.drafter

    @property
    def steps(self) -> int:
        """Good steps taken (the drafter's training progress; bad steps do not count)."""
        return self.trainer.step_count

    def train_step(self, items: list[dict] | None = None) -> dict | None:
        """One guarded step on `items`, or on a batch drawn from the buffer; the metrics, or None if the step
        failed (rolled back) or the buffer is empty."""
        t0 = time.perf_counter()
        try:
            if items is None:
                items = self.buffer.training_items(self.batch_size, self.label_fn, self.drafter.d2t, self.generator,
                                                   self.window)
                if not items:
                    return None
            metrics = self.trainer.step(items)
        except Exception as exc:  # any failure of a step must leave the last good drafter
            self._rollback(exc)
            return None
        finally:
            self.train_time_s += time.perf_counter() - t0
        self._good = _clone_into(self._good, self.trainer.state_dict())
        self.last_loss, self.last_acc = metrics["loss"], metrics["acc"]
        self.last_step_ok, self.consecutive_bad = True, 0
        return {"step": self.steps, **metrics}

    def _rollback(self, exc: Exception) -> None:
        # a deep copy: the optimizer would otherwise adopt (and later update) the snapshot's own tensors
        self.trainer.load_state_dict(copy.deepcopy(self._good))
        self.bad_steps += 1
        self.consecutive_bad += 1
        self.last_step_ok = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        logger.warning("drafter step %d rolled back (%s); %d bad steps so far", self.steps + 1, self.last_error,
                       self.bad_steps)

    def run(self, should_yield: Callable[[], bool], max_steps: int | None = None, time_budget_s: float | None = None,
            after_step: Callable[[dict], None] | None = None) -> dict:
        """Train while `should_yield()` is False (asked before every step) and within `max_steps` steps tried and
        `time_budget_s` seconds. `after_step` gets each good step's metrics (e.g. to publish). Returns
        {"steps": good steps, "bad_steps", "elapsed_s", "stopped": why}."""
        t0 = time.perf_counter()
        tried = good = bad = 0
        stopped = "max_steps"
        while max_steps is None or tried < max_steps:
            if should_yield():
                stopped = "yield"
                break
            # No step starts that would likely end past the budget (a step's time: the last one's).
            if time_budget_s is not None and time.perf_counter() - t0 + self.last_step_s > time_budget_s:
                stopped = "time_budget"
                break
            if len(self.buffer) == 0:
                stopped = "no_data"
                break
            if self.consecutive_bad >= self.max_consecutive_bad:
                stopped = "failing"
                break
            tried += 1
            t_step = time.perf_counter()
            metrics = self.train_step()
            self.last_step_s = time.perf_counter() - t_step
            if metrics is None:
                bad += 1
                continue
            good += 1
            if after_step is not None:
                after_step(metrics)
        return {"steps": good, "bad_steps": bad, "elapsed_s": time.perf_counter() - t0, "stopped": stopped}

    def stats(self) -> dict:
        """Progress and health: good and bad steps, time spent training, last loss and top-1 accuracy per depth."""
        return {"steps": self.steps, "bad_steps": self.bad_steps, "train_time_s": self.train_time_s,
                "last_loss": self.last_loss, "acc": list(self.last_acc), "last_step_ok": self.last_step_ok,
                "last_error": self.last_error}

    # ------------------------------------------------------------------ persistence
    def checkpoint(self, directory: str) -> str:
        """Write the last good state (drafter, optimizer, schedule, steps, sampling RNG, stats) to
        `directory/spot_trainer.pt` atomically: a temporary file, fsync, then rename. Returns the path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CHECKPOINT_FILE)
        state = {"format": CHECKPOINT_FORMAT, "trainer": self._good, "rng": self.generator.get_state(),
                 "batch_size": self.batch_size, "window": self.window,
                 "max_consecutive_bad": self.max_consecutive_bad,
                 "stats": {"bad_steps": self.bad_steps, "train_time_s": self.train_time_s,
                           "last_loss": self.last_loss, "last_acc": list(self.last_acc)}}
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def resume(cls, directory: str, target: ModelConfig, embed: torch.nn.Module, rope, buffer: DrafterDataBuffer,
               label_fn: Callable[[torch.Tensor], torch.Tensor], device="cpu") -> SpotTrainer:
        """The trainer saved by `checkpoint(directory)`, continuing exactly where it stopped (given the same
        buffer contents): same weights, optimizer moments, schedule position and batch sampling."""
        path = os.path.join(directory, CHECKPOINT_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no spot trainer checkpoint at {path!r}")
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path!r} is not a tlt spot trainer checkpoint")
        saved = state["trainer"]
        dcfg = DrafterConfig(**{**saved["drafter_cfg"], "aux_layers": tuple(saved["drafter_cfg"]["aux_layers"])})
        drafter = EagleDrafter(dcfg, target).to(device)
        trainer = DrafterTrainer(drafter, embed, rope, TrainerConfig(**saved["config"]))
        trainer.load_state_dict(saved)
        spot = cls(trainer, buffer, label_fn, batch_size=state["batch_size"], window=state["window"],
                   max_consecutive_bad=state["max_consecutive_bad"])
        spot.generator.set_state(state["rng"].cpu())
        stats = state["stats"]
        spot.bad_steps, spot.train_time_s = stats["bad_steps"], stats["train_time_s"]
        spot.last_loss, spot.last_acc = stats["last_loss"], stats["last_acc"]
        return spot

