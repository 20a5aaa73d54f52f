"""Weights broadcast by a trainer over torch.distributed, received the way SGLang receives them.

The trainer and the engine form a process group of their own, made as SGLang's (and verl's, slime's)
`init_custom_process_group` makes it: a TCP store at master_address:master_port hosted by rank 0 (the
trainer), the group's keys under the prefix `group_name`, and the default process group left alone, so a
trainer that runs one already (Megatron, FSDP) is undisturbed. The engine is rank `rank_offset`.

One transfer: the trainer sends the names, dtypes and shapes of a bucket of tensors (over HTTP), then
broadcasts each tensor from rank 0 in that order. `receive` takes them all into fresh buffers, even
tensors the engine will refuse: a broadcast from rank 0 completes only when every rank takes part, so
refusing early would leave the trainer waiting until its timeout. Validation and the atomic commit come
after (Engine.update_weights_from_distributed).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tlt.engine.models.weights import WeightUpdateError

BACKENDS = ("gloo", "nccl")


@dataclass
class WeightsUpdateGroup:
    """A joined group; `device` is where its broadcasts land (gloo: CPU, nccl: the engine's GPU)."""

    name: str
    backend: str
    rank: int
    world_size: int
    device: torch.device
    pg: dist.ProcessGroup
    # One transfer at a time: two interleaved sequences of broadcasts would swap tensors between them.
    lock: threading.Lock = field(default_factory=threading.Lock)


def join_group(name: str, backend: str, master_address: str, master_port: int, rank: int, world_size: int,
               engine_device: torch.device) -> WeightsUpdateGroup:
    """Join the trainer's group as `rank`; blocks until all `world_size` ranks have joined (or torch's
    default timeout of 30 minutes, as SGLang, which is also the limit of one broadcast)."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        default_pg_timeout,
        rendezvous,
    )

    if not isinstance(name, str) or not name:
        raise ValueError("group_name must be a non-empty string")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl" and engine_device.type != "cuda":
        raise ValueError("backend nccl needs an engine on CUDA; use gloo on CPU")
    if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
        raise ValueError(f"this torch build has no {backend} backend")
    if world_size < 2 or not 1 <= rank < world_size:
        raise ValueError(f"rank_offset {rank} and world_size {world_size}: need 1 <= rank_offset < world_size "
                         "(rank 0 is the trainer)")
    if not 0 < master_port < 65536:
        raise ValueError(f"master_port {master_port} is not a TCP port")
    timeout = default_pg_timeout
    host = f"[{master_address}]" if ":" in master_address and not master_address.startswith("[") else master_address
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(name, store),
                                      group_name=name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    device = engine_device if backend == "nccl" else torch.device("cpu")
    return WeightsUpdateGroup(name, backend, rank, world_size, device, pg)


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16 (trainers send either)."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def parse_transfer(names: list[str], dtypes: list[str], shapes: list[list[int]]) -> list[tuple]:
    """(name, dtype, shape) per tensor of a transfer. What fails here cannot even be received."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
    if not names:
        raise ValueError("no tensors in the update")
    specs = []
    for name, dtype, shape in zip(names, dtypes, shapes):
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"shape of {name!r} must be a list of integers >= 0, got {shape!r}")
        specs.append((name, parse_dtype(dtype), tuple(shape)))
    return specs


def receive(group: WeightsUpdateGroup, specs: list[tuple]) -> list[tuple[str, torch.Tensor]]:
    """Take part in the trainer's broadcast of every tensor in `specs` (blocks until all have arrived)."""
    on_gpu = group.device.type == "cuda"
    # NCCL works on the calling thread's current device, and a worker thread starts on device 0.
    with group.lock, torch.cuda.device(group.device) if on_gpu else contextlib.nullcontext():
        tensors = [(name, torch.empty(shape, dtype=dtype, device=group.device)) for name, dtype, shape in specs]
        try:
            works = [dist.broadcast(t, src=0, group=group.pg, async_op=True) for _, t in tensors]
            for w in works:
                w.wait()
            if on_gpu:  # the consumer reads them from another thread's stream
                torch.cuda.synchronize(group.device)
        except RuntimeError as e:
            raise WeightUpdateError(f"receiving the broadcast on group {group.name!r} failed ({e}); the group "
                                    "may be broken: destroy it and init a new one") from None
    return tensors


def leave(group: WeightsUpdateGroup) -> None:
    """Destroy the engine's side of the group; refused while a transfer is running."""
    if not group.lock.acquire(blocking=False):
        raise ValueError(f"group {group.name!r} is receiving weights; destroy it after the transfer")
    try:
        dist.destroy_process_group(group.pg)
    finally:
        group.lock.release()
