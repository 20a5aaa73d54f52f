"""Delivery of the online drafter: versioned snapshots handed to every engine, which swaps them in between
decode rounds (`engine.update_drafter`).

Only a drafter that is known good leaves the trainer: the last step succeeded and every weight is finite.
Versions are "<prefix>-<k>" with k increasing by one per publish (and past any folder already written),
so engines and logs can order them.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
import time

import torch

from tlt.drafter_sync.trainer import SpotTrainer
from tlt.engine.spec.drafter import EagleDrafter

logger = logging.getLogger("tlt.drafter")


class DrafterPublisher:
    """Snapshots the spot trainer's drafter every `every_steps` good steps (or on demand) as a new version,
    writes it to `out_dir/<version>` if given, and hands a copy to each registered engine.

    An engine is any object with `update_drafter(drafter: EagleDrafter, version: str)`; each gets its own
    copy, since an engine may move or cast the module in place."""

    def __init__(self, spot: SpotTrainer, engines=(), *, every_steps: int | None = None, out_dir: str | None = None,
                 prefix: str = "online"):
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        if not re.fullmatch(r"[A-Za-z0-9_.]+", prefix):
            raise ValueError(f"version prefix must be letters, digits, '_' or '.', got {prefix!r}")
        self.spot = spot
        self.engines = list(engines)
        self.every_steps, self.out_dir, self.prefix = every_steps, out_dir, prefix
        self.index = self._last_written_index()
        self.version: str | None = None
        self.published_step: int | None = None  # the trainer's good-step count at the last publish
        self.failures = 0  # deliveries an engine refused (the engine keeps its drafter)
        self._latest: EagleDrafter | None = None
        self._lock = threading.Lock()

    def _last_written_index(self) -> int:
        """The highest k of "<prefix>-<k>" folders in `out_dir`: a restarted publisher never reuses a version."""
        if self.out_dir is None or not os.path.isdir(self.out_dir):
            return 0
        pat = re.compile(rf"{re.escape(self.prefix)}-(\d+)")
        found = [int(m.group(1)) for name in os.listdir(self.out_dir) if (m := pat.fullmatch(name))]
        return max(found, default=0)

    def register(self, engine) -> None:
        """Add an engine; it gets the latest published drafter at once, if there is one."""
        with self._lock:
            self.engines.append(engine)
            if self._latest is not None:
                self._deliver(engine, self._latest, self.version)

    def maybe_publish(self, metrics: dict | None = None) -> str | None:
        """Publish if `every_steps` good steps passed since the last publish (fits `SpotTrainer.run`'s
        `after_step`); the new version, or None."""
        if self.every_steps is None:
            return None
        if self.spot.steps - (self.published_step or 0) < self.every_steps:
            return None
        return self.publish()

    def publish(self) -> str | None:
        """Snapshot, write and deliver the drafter now; the new version, or None when there is nothing new
        or the drafter is not known good (its last step failed, or a weight is not finite)."""
        with self._lock:
            spot = self.spot
            if not spot.last_step_ok:
                logger.warning("not publishing the drafter: its last step failed (%s)", spot.last_error)
                return None
            if self.published_step == spot.steps:
                return None
            snap = copy.deepcopy(spot.drafter)
            for p in snap.parameters():
                p.grad = None
            snap.eval().requires_grad_(False)
            if not all(torch.isfinite(t).all() for t in snap.state_dict().values() if t.is_floating_point()):
                logger.warning("not publishing the drafter: non-finite weights after step %d", spot.steps)
                return None
            version = f"{self.prefix}-{self.index + 1}"
            snap.cfg.version = version
            if self.out_dir is not None:
                self._write(snap, version)
            for engine in self.engines:
                self._deliver(engine, snap, version)
            self.index += 1
            self.version, self.published_step, self._latest = version, spot.steps, snap
            logger.info("published drafter %s (step %d, loss %s)", version, spot.steps, spot.last_loss)
            return version

    def _write(self, drafter: EagleDrafter, version: str) -> None:
        # whole folder or nothing: a reader never sees a half-written drafter under its final name
        final = os.path.join(self.out_dir, version)
        tmp = os.path.join(self.out_dir, f".{version}.tmp-{os.getpid()}-{time.monotonic_ns()}")
        drafter.save(tmp)
        os.replace(tmp, final)

    def _deliver(self, engine, drafter: EagleDrafter, version: str) -> None:
        try:
            engine.update_drafter(copy.deepcopy(drafter), version)
        except Exception as exc:  # one engine refusing must not keep the drafter from the others
            self.failures += 1
            logger.warning("engine %r refused drafter %s: %s", engine, version, exc)
