"""The graph pool's policy: which graphs exist, which are kept within the byte budget, which get evicted.

One graph per `GraphKey(phase, bucket, shape)`. `shape` is the per-row token count (or the pair of
numbers) that fixes a phase's tensor shapes, and only that: two speculative configurations ("arms") that
give the same shape share the graph. Verify graphs are keyed by `num_draft_tokens`, so arms with equal
draft-token counts share one; catch-up graphs by `num_steps + 1` (a round accepts at most `num_steps`
draft tokens plus the target's bonus token, as SGLang's draft-extend graph); draft graphs by
`(num_steps, topk)` (the drafter's expansion steps; the tree selection after them, which depends on
`num_draft_tokens`, is not part of that graph).

Memory (see capture.py for how it is measured): every graph copies its outputs into its own static
buffers, so once a capture ends the shared pool holds only free blocks that every graph reuses — the
*workspace*. A graph's own cost is its static buffers; the pool's cost is

    bytes = workspace (the shared pool's reserved bytes) + sum of held graphs' static bytes

and that figure never exceeds `budget_bytes` when a call returns (a capture whose real cost overshot its
warm-up's measure is released before it returns, step 3 below). Eviction releases a graph's static
buffers; the workspace only returns to the device when no graph is left (a shared CUDA memory pool cannot
shrink while any graph uses it), which is why it is counted once, in full, whatever is held.

Admission of a graph the selector may use (`plan`) but that is not held, at its first run:
    1. a warm-up run measures what capturing needs: the static buffers plus the run's peak working set
       (what the capture adds to the workspace when it can reuse nothing, up to the allocator's rounding);
    2. if that does not fit, the least useful non-decode graphs are evicted to make room — but only when
       the newcomer is clearly more useful than what it displaces (`margin` times their summed usefulness),
       so that two arms that alternate cannot make the pool capture at every step; a decode graph may
       displace any non-decode graph. Usefulness = uses decayed with a half-life of `half_life` runs.
    3. after capture the measured figures are checked again; a capture that overshot is released.
A graph that does not fit runs eagerly (its last measured need is remembered, so an eager run costs no
extra warm-up until room may exist). Decode graphs are never evicted to make room for other graphs; they
go only when the workspace alone leaves no room for them (step 3), since the budget comes first.

Departures from the first sketch (issue 4), and why: outputs are copied into per-graph static buffers
inside the graph (one copy kernel per output) because graphs that leave their outputs in a shared pool
cannot give memory back one at a time; graphs are captured at their first run or up front (`plan` with
`build`), whichever the caller prefers; eviction has hysteresis (`margin`) so that it cannot thrash.

Not yet wired into the engine: its decode attends up to the longest running sequence (`kv_len` changes
every step), so a graph, whose shapes are frozen, needs a decode step with a fixed attention length and
masks — a later step of the runner.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tlt.engine.cuda_graphs.capture import Capturer, Graph, Warmup

if TYPE_CHECKING:
    from tlt.engine.spec.worker import SpecConfig

PHASES = ("decode", "draft", "verify", "catch_up")


@dataclass(frozen=True)
class GraphKey:
    """One captured graph: the phase it runs, the batch bucket it was captured at, its per-row shape."""

    phase: str
    bucket: int
    shape: int | tuple[int, ...]

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r} is not one of {PHASES}")
        if self.bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {self.bucket}")


def keys_for_arm(arm: SpecConfig | None, bucket: int) -> tuple[GraphKey, ...]:
    """The graphs one speculative round of `arm` at `bucket` rows replays (None: plain decode)."""
    if arm is None:
        return (GraphKey("decode", bucket, 1),)
    keys = [GraphKey("catch_up", bucket, arm.num_steps + 1)]
    if arm.num_steps > 1:  # a one-step draft takes its tokens from catch-up's output: no drafter pass
        keys.append(GraphKey("draft", bucket, (arm.num_steps, arm.topk)))
    keys.append(GraphKey("verify", bucket, arm.num_draft_tokens))
    return tuple(keys)


def batch_buckets(max_bs: int) -> tuple[int, ...]:
    """Batch sizes to capture: 1, 2, 4, 8, then p and 1.5p for p = 16, 32, 64, ..., and `max_bs` last.

    Padding a batch up to the next bucket wastes at most half of it beyond 8 rows, with about two graphs
    per doubling (SGLang's capture list has the same shape)."""
    if max_bs < 1:
        raise ValueError(f"max_bs must be >= 1, got {max_bs}")
    out = [1, 2, 4, 8]
    p = 16
    while p < max_bs:
        out += [p, p * 3 // 2]
        p *= 2
    out = sorted({b for b in out if b < max_bs} | {max_bs})
    return tuple(out)


def bucket_for(bs: int, buckets: tuple[int, ...]) -> int:
    """The smallest captured bucket that holds `bs` rows (the batch is padded up to it)."""
    i = bisect.bisect_left(buckets, bs)
    if bs < 1 or i == len(buckets):
        raise ValueError(f"batch size {bs} is outside the captured buckets 1..{buckets[-1]}")
    return buckets[i]


def pad_rows(t: torch.Tensor, bucket: int, fill: float | int = 0) -> torch.Tensor:
    """`t` [bs, ...] -> [bucket, ...], the extra rows filled with `fill` (their outputs are never read)."""
    extra = bucket - t.shape[0]
    if extra < 0:
        raise ValueError(f"{t.shape[0]} rows do not fit bucket {bucket}")
    if extra == 0:
        return t
    return torch.cat([t, t.new_full((extra, *t.shape[1:]), fill)])


class GraphPool:
    """Captured graphs for the (bucket, arm) pairs the selector may choose, within a byte budget."""

    def __init__(self, capturer: Capturer, budget_bytes: int, buckets: tuple[int, ...],
                 half_life: float = 256.0, margin: float = 2.0):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive batch sizes, got {buckets}")
        self.capturer = capturer
        self.budget = budget_bytes
        self.buckets = tuple(buckets)
        self.half_life = half_life
        self.margin = margin
        self.planned: frozenset[GraphKey] = frozenset(GraphKey("decode", b, 1) for b in self.buckets)
        self.held: dict[GraphKey, Graph] = {}
        self._use: dict[GraphKey, tuple[float, int]] = {}  # key -> (decayed use count, tick of last use)
        self._need: dict[GraphKey, int] = {}  # key -> bytes its last warm-up (or capture) measured
        self._measured: dict[GraphKey, tuple[int, int]] = {}  # key -> (static bytes, peak bytes) measured
        self._tick = 0
        self.counts = {"hits": 0, "misses": 0, "captures": 0, "evictions": 0, "eager_runs": 0}

    # ------------------------------------------------------------------ accounting
    @property
    def bytes(self) -> int:
        """What the pool holds now, in the capturer's measured figures: workspace + static buffers."""
        return self.capturer.workspace_bytes() + sum(g.static_bytes for g in self.held.values())

    def bucket_for(self, bs: int) -> int:
        """The bucket a batch of `bs` rows is padded up to."""
        return bucket_for(bs, self.buckets)

    def usefulness(self, key: GraphKey) -> float:
        """Runs of `key` (replayed or not), each weighing half as much every `half_life` runs of the pool."""
        count, tick = self._use.get(key, (0.0, self._tick))
        return count * math.exp2(-(self._tick - tick) / self.half_life)

    def stats(self) -> dict[str, int]:
        """Graphs held, bytes held (workspace + static buffers), budget, and the run counters."""
        return {"graphs": len(self.held), "bytes": self.bytes, "budget": self.budget,
                "workspace_bytes": self.capturer.workspace_bytes(), "planned": len(self.planned), **self.counts}

    def footprint(self, arms: Iterable[SpecConfig]) -> dict[str, Any]:
        """What capturing every (bucket, arm) pair would hold, next to what the pool holds.

        `bytes_all` sums the measured static buffers of every key plus the largest of the workspace and
        every measured peak (one shared pool pays the workspace once); keys never warmed up are counted in
        `unmeasured_all` and left out of `bytes_all`, which is then a lower bound."""
        arms = list(arms)
        keys = {k for b in self.buckets for arm in [None, *arms] for k in keys_for_arm(arm, b)}
        unshared = len(self.buckets) * (1 + sum(len(keys_for_arm(arm, 1)) for arm in arms))
        measured = [self._measured[k] for k in keys if k in self._measured]
        workspace = max([self.capturer.workspace_bytes(), *(peak for _, peak in measured)])
        return {
            "pairs": len(self.buckets) * (1 + len(arms)),
            "graphs_all": len(keys),
            "graphs_all_unshared": unshared,
            "bytes_all": workspace + sum(static for static, _ in measured),
            "unmeasured_all": len(keys) - len(measured),
            "graphs_held": len(self.held),
            "bytes_held": self.bytes,
        }

    # ------------------------------------------------------------------ planning
    def plan(self, allowed: Iterable[tuple[int, SpecConfig | None]],
             build: Callable[[GraphKey], tuple[Callable, tuple[torch.Tensor, ...]]] | None = None) -> None:
        """Capture only what the selector may choose: `allowed` (bucket, arm) pairs, plus plain decode at
        every bucket. Held graphs outside the new plan are released.

        With `build` (key -> (fn, example inputs)), planned graphs are captured now rather than at their
        first run: decode first (it is always kept), then largest bucket first, so that the workspace is
        sized by the largest working sets and smaller graphs reuse it (nano-vllm's order)."""
        planned = {GraphKey("decode", b, 1) for b in self.buckets}
        for bucket, arm in allowed:
            if bucket not in self.buckets:
                raise ValueError(f"bucket {bucket} is not one of the pool's buckets {self.buckets}")
            planned.update(keys_for_arm(arm, bucket))
        for key in [k for k in self.held if k not in planned]:
            self._evict(key)
        self.planned = frozenset(planned)
        if build is None:
            return
        order = sorted(planned - self.held.keys(), key=lambda k: (k.phase != "decode", -k.bucket, k.phase, repr(k)))
        for key in order:
            fn, inputs = build(key)
            self._admit(key, self.capturer.warm_up(key, fn, tuple(inputs)))

    # ------------------------------------------------------------------ the hot path
    def run(self, key: GraphKey, fn: Callable, inputs: tuple[torch.Tensor, ...]) -> Any:
        """fn(*inputs), replayed from the graph of `key` when held, captured now if it is planned and fits,
        else run eagerly. Inputs must have the key's bucket shapes (see `pad_rows`). A replay returns the
        graph's static output buffers: valid until the next run of the same key."""
        self._tick += 1
        self._use[key] = (self.usefulness(key) + 1.0, self._tick)
        graph = self.held.get(key)
        if graph is not None:
            self.counts["hits"] += 1
            return graph.replay(inputs)
        if key not in self.planned:
            self.counts["eager_runs"] += 1
            return fn(*inputs)
        self.counts["misses"] += 1
        if key in self._need and self._victims(key, self._need[key]) is None:
            self.counts["eager_runs"] += 1  # known not to fit now: skip the warm-up's measuring
            return fn(*inputs)
        warm = self.capturer.warm_up(key, fn, tuple(inputs))
        if not self._admit(key, warm):
            self.counts["eager_runs"] += 1
        return warm.outputs

    # ------------------------------------------------------------------ admission and eviction
    def _victims(self, key: GraphKey, need: int) -> list[GraphKey] | None:
        """The graphs to evict so that `need` more bytes fit ([] if they fit now), or None if it can't be."""
        free = self.budget - self.bytes
        if need <= free:
            return []
        candidates = sorted((k for k in self.held if k.phase != "decode"),
                            key=lambda k: (self.usefulness(k), self._use.get(k, (0.0, 0))[1]))
        victims: list[GraphKey] = []
        for k in candidates:
            if need <= free:
                break
            victims.append(k)
            free += self.held[k].static_bytes
        if need > free:
            return None
        if key.phase != "decode" and self.usefulness(key) <= self.margin * sum(map(self.usefulness, victims)):
            return None
        return victims

    def _admit(self, key: GraphKey, warm: Warmup) -> bool:
        """Capture `key` from its warm-up if it fits (evicting as `_victims` says); True if held after."""
        self._need[key] = warm.static_bytes + warm.peak_bytes
        self._measured[key] = (warm.static_bytes, warm.peak_bytes)
        victims = self._victims(key, self._need[key])
        if victims is None:
            return False
        for v in victims:
            self._evict(v)
        workspace = self.capturer.workspace_bytes()
        graph = self.capturer.capture(warm)
        if graph is None:
            return False
        self.held[key] = graph
        self.counts["captures"] += 1
        self._measured[key] = (graph.static_bytes, warm.peak_bytes)
        if self.bytes > self.budget:
            # The warm-up's figures under-counted (allocator rounding): what the capture really took is
            # remembered and the graph goes. If the workspace's growth alone broke the budget, the least
            # useful graphs follow, decode graphs last; with none left the capturer frees the workspace.
            growth = self.capturer.workspace_bytes() - workspace
            self._need[key] = max(self._need[key], graph.static_bytes + growth)
            self._evict(key)
            while self.held and self.bytes > self.budget:
                self._evict(min(self.held, key=lambda k: (k.phase == "decode", self.usefulness(k),
                                                         self._use.get(k, (0.0, 0))[1])))
        return key in self.held

    def _evict(self, key: GraphKey) -> None:
        self.held.pop(key).release()
        self.counts["evictions"] += 1
