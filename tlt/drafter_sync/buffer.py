"""A bounded store of what rollouts compute anyway, for training the drafter online.

A record is one finished sequence as the engine saw it: its tokens, the target's hidden states at the
drafter's three aux layers and the target's last hidden state, all captured during prefill and verify
(no extra forward pass). The buffer keeps them within a byte budget, evicting the oldest first, drops
records of stale policies by weight version, samples recent records more often, and turns records into
training items (labels computed from the stored last hidden state by the caller's LM head).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tlt.drafter_sync.training import crop

RECORD_KEYS = ("tokens", "aux", "hidden", "prompt_len", "weight_version")


@dataclass
class _Entry:
    seq: int  # push order: the recency of the record
    record: dict
    nbytes: int


def _own(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU tensor owning exactly its bytes (a view would pin, and hide, its whole base)."""
    t = t.detach().cpu().contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


class DrafterDataBuffer:
    """Records of finished rollouts within `capacity_bytes`; thread-safe (an HTTP thread may push).

    `hidden_size`: the target's; None takes it from the first record. `recency_half_life`: a record
    `h` pushes older than the newest is sampled half as often (None: uniformly)."""

    def __init__(self, capacity_bytes: int, hidden_size: int | None = None,
                 recency_half_life: float | None = 256.0):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if recency_half_life is not None and recency_half_life <= 0:
            raise ValueError(f"recency_half_life must be positive, got {recency_half_life}")
        self.capacity_bytes = capacity_bytes
        self.hidden_size = hidden_size
        self.recency_half_life = recency_half_life
        self._lock = threading.Lock()
        self._entries: deque[_Entry] = deque()
        self._nbytes = 0
        self._seq = 0
        self._versions: list[str] = []  # weight versions of the kept records, in the order first seen
        self._retired: set[str] = set()  # versions aged out: late records of them are refused
        self.counts = {"pushed": 0, "evicted": 0, "aged_out": 0, "refused_stale": 0}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held (never above `capacity_bytes`)."""
        return self._nbytes

    def push(self, record: dict) -> bool:
        """Store one record; False if its weight version was already aged out. ValueError on bad input,
        which leaves the buffer unchanged."""
        rec = self._validated(record)
        nbytes = rec["tokens"].nbytes + rec["aux"].nbytes + rec["hidden"].nbytes
        if nbytes > self.capacity_bytes:
            raise ValueError(f"record of {nbytes} bytes exceeds the buffer's capacity of {self.capacity_bytes}")
        with self._lock:
            if rec["weight_version"] in self._retired:
                self.counts["refused_stale"] += 1
                return False
            if self.hidden_size is None:
                self.hidden_size = rec["hidden"].shape[1]
            elif rec["hidden"].shape[1] != self.hidden_size:
                raise ValueError(f"record hidden size {rec['hidden'].shape[1]} != the buffer's {self.hidden_size}")
            if rec["weight_version"] not in self._versions:
                self._versions.append(rec["weight_version"])
            self._entries.append(_Entry(self._seq, rec, nbytes))
            self._seq += 1
            self._nbytes += nbytes
            self.counts["pushed"] += 1
            while self._nbytes > self.capacity_bytes:
                self._nbytes -= self._entries.popleft().nbytes
                self.counts["evicted"] += 1
        return True

    @staticmethod
    def _validated(record: dict) -> dict:
        if not isinstance(record, dict) or any(k not in record for k in RECORD_KEYS):
            raise ValueError(f"a drafter data record is a dict with keys {RECORD_KEYS}")
        tokens, aux, hidden = record["tokens"], record["aux"], record["hidden"]
        if not all(isinstance(t, torch.Tensor) for t in (tokens, aux, hidden)):
            raise ValueError("record tokens, aux and hidden must be tensors")
        if tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32) or len(tokens) < 2:
            raise ValueError(f"record tokens must be a 1-D integer tensor of >= 2 tokens, got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        m = len(tokens)
        if hidden.dim() != 2 or hidden.shape[0] != m or not hidden.is_floating_point():
            raise ValueError(f"record hidden must be a float tensor [{m}, H], got {tuple(hidden.shape)} {hidden.dtype}")
        H = hidden.shape[1]
        if aux.shape != (m, 3 * H) or not aux.is_floating_point():
            raise ValueError(f"record aux must be a float tensor [{m}, {3 * H}], got {tuple(aux.shape)} {aux.dtype}")
        prompt_len, version = record["prompt_len"], record["weight_version"]
        if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or not 0 <= prompt_len <= m:
            raise ValueError(f"record prompt_len must be an int in [0, {m}], got {prompt_len!r}")
        if not isinstance(version, str):
            raise ValueError(f"record weight_version must be a str, got {version!r}")
        if not (torch.isfinite(aux).all() and torch.isfinite(hidden).all()):
            raise ValueError("record hidden states are not finite")
        return {"tokens": _own(tokens).long(), "aux": _own(aux), "hidden": _own(hidden), "prompt_len": prompt_len,
                "weight_version": version}

    def age_out(self, current_weight_version: str, keep_versions: int = 1) -> int:
        """Drop records of all but the `keep_versions` most recent policy versions (`current_weight_version`
        counts as the newest); returns how many were dropped. Later records of dropped versions are refused."""
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        with self._lock:
            if current_weight_version in self._retired:
                raise ValueError(f"weight version {current_weight_version!r} was already aged out")
            if current_weight_version in self._versions:
                self._versions.remove(current_weight_version)
            self._versions.append(current_weight_version)
            stale = set(self._versions[:-keep_versions])
            if not stale:
                return 0
            self._retired |= stale
            self._versions = self._versions[-keep_versions:]
            kept = deque(e for e in self._entries if e.record["weight_version"] not in stale)
            dropped = len(self._entries) - len(kept)
            self._entries = kept
            self._nbytes = sum(e.nbytes for e in kept)
            self.counts["aged_out"] += dropped
            return dropped

    def sample(self, n: int, generator: torch.Generator) -> list[dict]:
        """`n` records drawn with replacement, recent ones favoured; [] when the buffer is empty."""
        with self._lock:
            entries = list(self._entries)
        if not entries:
            return []
        if self.recency_half_life is None:
            weights = torch.ones(len(entries), dtype=torch.float64)
        else:
            age = torch.tensor([entries[-1].seq - e.seq for e in entries], dtype=torch.float64)
            weights = torch.exp2(-age / self.recency_half_life)
        idx = torch.multinomial(weights, n, replacement=True, generator=generator)
        return [entries[i].record for i in idx.tolist()]

    def training_items(self, n: int, label_fn: Callable[[torch.Tensor], torch.Tensor], d2t: torch.Tensor,
                       generator: torch.Generator, window: int | None = None) -> list[dict]:
        """`n` sampled records as training items (see `training_items`), cropped to `window` positions."""
        return training_items(self.sample(n, generator), label_fn, d2t, generator, window)

    def stats(self) -> dict:
        """Records, bytes, the weight versions held, and counts of pushes, evictions and age-outs."""
        with self._lock:
            return {"records": len(self._entries), "bytes": self._nbytes, "capacity_bytes": self.capacity_bytes,
                    "versions": list(self._versions), **self.counts}


class HeadLabels:
    """A label function that runs the target's LM head at the draft vocabulary's rows only: the labels are the
    target's logits there, renormalised, so nothing else is needed (for an 8k draft vocabulary of a 49k one,
    a sixth of the work of the full head). `head_weight()` returns the live [V, H] weight, read at every
    call so that policy weight updates are seen."""

    def __init__(self, head_weight: Callable[[], torch.Tensor]):
        self.head_weight = head_weight

    def __call__(self, hidden: torch.Tensor, d2t: torch.Tensor | None = None) -> torch.Tensor:
        w = self.head_weight()
        if d2t is not None:
            w = w[d2t.to(w.device)]
        return torch.nn.functional.linear(hidden.to(w.device, w.dtype), w).float()


def training_items(records: list[dict], label_fn: Callable[[torch.Tensor], torch.Tensor], d2t: torch.Tensor,
                   generator: torch.Generator | None = None, window: int | None = None) -> list[dict]:
    """Records as training items {"tokens", "aux", "target_logp", "loss_mask"} (the format of
    `training.target_features`), cropped to `window` positions first so labels cost only what is trained.

    `label_fn`: stored last hidden states [N, H] -> the target's logits [N, V] (for an engine,
    `lambda h: engine.model.logits(h.to(engine.device))`), or a `HeadLabels` (logits at `d2t` only).
    Labels are the log-softmax of the logits over the draft vocabulary `d2t`; the loss covers drafter
    positions p >= prompt_len - 2, whose label is a generated token."""
    cropped = []
    for rec in records:
        m = len(rec["tokens"])
        part = {"tokens": rec["tokens"], "aux": rec["aux"], "hidden": rec["hidden"],
                "loss_mask": torch.arange(m) >= max(rec["prompt_len"] - 2, 0)}
        cropped.append(crop(part, window, generator) if window is not None else part)
    if not cropped:
        return []
    with torch.no_grad():
        hidden = torch.cat([c["hidden"] for c in cropped])
        if isinstance(label_fn, HeadLabels):
            logits = label_fn(hidden, d2t)  # [sum of lengths, Vd]
        else:
            logits = label_fn(hidden)[..., d2t.to(hidden.device)]  # [sum of lengths, V] -> [.., Vd]
        logp = torch.log_softmax(logits.float(), dim=-1).to(torch.bfloat16).cpu()
    out, start = [], 0
    for c in cropped:
        m = len(c["tokens"])
        out.append({"tokens": c["tokens"], "aux": c["aux"].float(), "target_logp": logp[start: start + m],
                    "loss_mask": c["loss_mask"]})
        start += m
    return out
