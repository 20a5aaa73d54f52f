"""Capturers: how the graph pool turns a function into a replayable graph, and what that costs in bytes.

A capturer warms a function up (one eager run whose outputs answer the call that triggered it, with the
bytes a capture would need measured on the way), captures it, and reports the shared workspace's size.
`EagerCapturer` never captures, so that the pool's same interface runs everything eagerly (CPU, or CUDA
with graphs off for debugging). `CudaGraphCapturer` captures into one shared CUDA memory pool.

Contract for a captured function: `fn(*inputs)` takes tensors, returns a tensor or a tuple of tensors,
syncs nothing with the host (no `.item()`, no data-dependent shapes), and is idempotent for the same
inputs — the warm-up runs it more than once (writing the same K/V to the same slots is fine). Run the
pool under one grad mode (the engine's `torch.inference_mode`): static buffers made in inference mode
cannot be written outside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from tlt.engine.cuda_graphs.pool import GraphKey

_ALLOC_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes


@dataclass
class Warmup:
    """One eager run of a function about to be captured, and what capturing it would take."""

    key: GraphKey
    fn: Callable
    inputs: tuple[torch.Tensor, ...]
    outputs: Any  # fn(*inputs): the answer to the run that triggered the capture
    static_bytes: int  # the graph's own buffers (a copy of the inputs and of the outputs), allocator-rounded
    peak_bytes: int  # the run's peak working set: the most the capture can add to the shared workspace


class Graph(Protocol):
    """A captured graph: replays on new inputs of the captured shapes; released on eviction."""

    static_bytes: int  # measured bytes of its own buffers, returned by `release`

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> Any: ...

    def release(self) -> None: ...


class Capturer(Protocol):
    """What the pool needs from a capture backend."""

    def warm_up(self, key: GraphKey, fn: Callable, inputs: tuple[torch.Tensor, ...]) -> Warmup: ...

    def capture(self, warm: Warmup) -> Graph | None:
        """A graph of `warm.fn` at the shapes of `warm.inputs`; None if this capturer never captures."""
        ...

    def workspace_bytes(self) -> int:
        """Bytes of the memory pool the graphs share (measured after the last capture or release)."""
        ...


class EagerCapturer:
    """Never captures: every run of the pool is `fn(*inputs)`."""

    def warm_up(self, key: GraphKey, fn: Callable, inputs: tuple[torch.Tensor, ...]) -> Warmup:
        return Warmup(key, fn, inputs, fn(*inputs), 0, 0)

    def capture(self, warm: Warmup) -> None:
        return None

    def workspace_bytes(self) -> int:
        return 0


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _rounded_bytes(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // _ALLOC_BLOCK) * _ALLOC_BLOCK


class CudaGraph:
    """A captured CUDA graph with its static input and output buffers."""

    def __init__(self, owner: CudaGraphCapturer, graph: torch.cuda.CUDAGraph, static_in: tuple[torch.Tensor, ...],
                 static_out: tuple[torch.Tensor, ...], single: bool, static_bytes: int):
        self.owner = owner
        self.graph = graph
        self.static_in = static_in
        self.static_out = static_out
        self.single = single
        self.static_bytes = static_bytes

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """Copy `inputs` into the static inputs, replay, return the static outputs (not copies: they are
        overwritten by this graph's next replay; clone what must outlive it)."""
        for dst, src in zip(self.static_in, inputs, strict=True):
            if dst.shape != src.shape:  # copy_ would broadcast a smaller batch silently
                raise ValueError(f"input of shape {tuple(src.shape)} replayed into a graph of {tuple(dst.shape)}")
            dst.copy_(src)
        self.graph.replay()
        return self.static_out[0] if self.single else self.static_out

    def release(self) -> None:
        """Free the graph and its static buffers (the workspace stays with the pool while graphs remain)."""
        self.graph.reset()
        self.static_in = self.static_out = ()
        self.owner.released()


class CudaGraphCapturer:
    """Captures into ONE shared memory pool (`torch.cuda.graph_pool_handle()`), on one side stream.

    Memory, in the caching allocator's own figures:
      * static buffers: a copy of the inputs and an empty tensor per output, allocated outside the pool
        just before capture; a graph's `static_bytes` is the `torch.cuda.memory_allocated()` delta of
        allocating them, which is exactly what `release` gives back.
      * workspace: the captured function's outputs are copied into the static outputs inside the graph,
        so every tensor allocated during capture is freed when it ends: the shared pool then holds only
        free blocks, which later captures reuse (graphs replay one at a time on one stream, never
        concurrently, so sharing them is safe). `workspace_bytes` is the sum of the pool's segments in
        `torch.cuda.memory_snapshot()`, measured after each capture and release. A shared pool's segments
        return to the device only once no graph uses it; releasing the last graph does that (the pool is
        emptied and a fresh one is used from then on; segments an old pool failed to give back still count).
    Not counted: the CUDA driver's memory for the instantiated graphs (not allocated through torch), and
    the transient memory of warm-up runs (an eager run's). `warm_up` resets torch's peak-memory statistics
    (`torch.cuda.max_memory_allocated`), and `torch.cuda.graph` empties torch's cache before each capture.
    Measurements assume no other thread allocates on the device meanwhile.
    """

    def __init__(self, warmup_runs: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaGraphCapturer needs CUDA; use EagerCapturer on this machine")
        if warmup_runs < 1:
            raise ValueError(f"warmup_runs must be >= 1, got {warmup_runs}")
        self.warmup_runs = warmup_runs
        self.stream = torch.cuda.Stream()
        self.pool = torch.cuda.graph_pool_handle()
        self._pools = {tuple(self.pool)}  # every pool used: segments a pool failed to give back still count
        self.live = 0
        self._workspace = 0

    def warm_up(self, key: GraphKey, fn: Callable, inputs: tuple[torch.Tensor, ...]) -> Warmup:
        """Run `fn` on the side stream the capture will use (cuBLAS handles, workspaces and lazy state are
        created there, outside the capture), measuring the last run's peak allocated bytes."""
        inputs = tuple(inputs)
        # The side stream waits for everything queued so far, including reads of earlier outputs whose
        # blocks (freed since) this run may reuse.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(self.warmup_runs - 1):
                fn(*inputs)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            outputs = fn(*inputs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.current_stream().wait_stream(self.stream)
        static = sum(_rounded_bytes(t) for t in (*inputs, *_as_tuple(outputs)))
        return Warmup(key, fn, inputs, outputs, static, peak)

    def capture(self, warm: Warmup) -> CudaGraph:
        """Capture `warm.fn` on copies of `warm.inputs` into the shared pool."""
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        static_in = tuple(t.clone() for t in warm.inputs)
        static_out = tuple(torch.empty_like(t) for t in _as_tuple(warm.outputs))
        static_bytes = torch.cuda.memory_allocated() - before
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = _as_tuple(warm.fn(*static_in))
            for dst, src in zip(static_out, out, strict=True):
                dst.copy_(src)
        del out  # the last references to tensors allocated in the pool: now all its blocks are free
        torch.cuda.synchronize()
        self.live += 1
        self._workspace = self._measure_workspace()
        return CudaGraph(self, graph, static_in, static_out, not isinstance(warm.outputs, tuple), static_bytes)

    def released(self) -> None:
        """Bookkeeping after a graph's release: with none left, the pool's segments go back to the device."""
        self.live -= 1
        if self.live == 0:
            torch.cuda.empty_cache()
            # A fresh handle: the allocator may keep the old pool's bookkeeping until its segments are
            # gone, and a capture into a pool nobody uses any more is not allowed.
            self.pool = torch.cuda.graph_pool_handle()
            self._pools.add(tuple(self.pool))
        self._workspace = self._measure_workspace()

    def workspace_bytes(self) -> int:
        return self._workspace

    def _measure_workspace(self) -> int:
        return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) in self._pools)
