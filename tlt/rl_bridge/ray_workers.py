"""The RL bridge's roles as Ray actors, for rollouts that outgrow one machine.

    coord = RolloutCoordinator.create(4, "path/to/policy", num_gpus=1, dtype="bfloat16")
    outs = coord.generate(prompt_ids, {"max_new_tokens": 1024, "temperature": 1.0}, return_logprob=True)
    coord.update_weights(policy.state_dict(), weight_version="step-8")

Each `RolloutWorker` actor owns one `tlt.Engine`. The `RolloutCoordinator` lives in the trainer's process
(the Ray driver): it splits a batch of prompts over the workers, puts new weights once into the object store
for all of them, publishes drafter versions to all, and reports a worker whose share finished while others
still run: that worker is idle until the step ends, which is where a drafter trainer can use it.

Workers are threaded actors: a weight or drafter update sent during a rollout runs beside `generate` and
lands between two engine steps (the engine's lock). An update never half-lands on one worker (the engine
validates every tensor before touching any); across workers, an update is the same call everywhere, so a bad
one is refused by every worker, and any other failure is reported with the workers it hit.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ray
import torch

from tlt.engine.engine import Engine, EngineError

# Threads per worker actor: one running `generate`, the others free for updates and stats meanwhile.
WORKER_CONCURRENCY = 4


class BroadcastError(RuntimeError):
    """An update that some or all workers refused.

    `failed` maps a worker index to its error; `succeeded` lists the workers that applied it. When
    `succeeded` is empty, nothing changed anywhere."""

    def __init__(self, what: str, failed: dict[int, str], succeeded: list[int]):
        if succeeded:
            head = (f"{what} failed on workers {sorted(failed)} (they keep their previous state); "
                    f"workers {succeeded} applied it")
        else:
            head = f"{what} rejected by every worker, nothing changed"
        first = failed[min(failed)]
        super().__init__(f"{head}: {first}")
        self.failed = failed
        self.succeeded = succeeded


class RolloutWorker:
    """One engine in one Ray actor. Create it through `RolloutCoordinator.create` (or wrap it yourself with
    `ray.remote(...)(RolloutWorker)`); every method returns plain data that Ray can ship back.

    `torch_num_threads` defaults to the CPUs Ray assigned to the actor: a second OpenMP thread per assigned
    core only makes workers that share a machine fight over it."""

    def __init__(self, model_path: str | None = None, **engine_kwargs: Any):
        if not engine_kwargs.get("torch_num_threads"):
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            engine_kwargs["torch_num_threads"] = max(1, int(cpus))
        torch.set_num_threads(engine_kwargs["torch_num_threads"])
        self.engine = Engine(model_path, **engine_kwargs)

    def generate(self, prompts: list, sampling_params: dict | None = None, **kwargs: Any) -> list[dict]:
        """Outputs for a share of prompts (texts or token-id lists): n per prompt, in order."""
        key = "prompt" if isinstance(prompts[0], str) else "input_ids"
        outs = self.engine.generate(**{key: list(prompts)}, sampling_params=sampling_params, **kwargs)
        return outs if isinstance(outs, list) else [outs]

    def abort_all(self) -> None:
        """End every request in flight (a running `generate` returns what it has, finish reason abort)."""
        self.engine.abort_request(abort_all=True)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]],
                       weight_version: str | None = None) -> dict:
        """Apply HF-named tensors atomically. Refusals come back as {"ok": False, "error": ...}, not as an
        exception, so that the coordinator can tell a bad update from a broken worker."""
        try:
            self.engine.update_weights_from_tensor(named_tensors, weight_version=weight_version)
        except (ValueError, TypeError, EngineError) as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "weight_version": self.engine.weight_version}
        return {"ok": True, "weight_version": self.engine.weight_version}

    def update_drafter(self, drafter, version: str | None = None) -> dict:
        """Swap in a drafter (an `EagleDrafter` or a folder this worker can read); as `update_weights`."""
        try:
            self.engine.update_drafter(drafter, version=version)
        except (ValueError, TypeError, OSError, EngineError) as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "drafter_version": self.engine.drafter_version}
        return {"ok": True, "drafter_version": self.engine.drafter_version}

    def stats(self) -> dict:
        """Engine counters, the versions held, and the Ray node the worker runs on."""
        return dict(self.engine.get_stats(), weight_version=self.engine.weight_version,
                    drafter_version=self.engine.drafter_version, node_id=ray.get_runtime_context().get_node_id())

    def weights_checksum(self) -> str:
        """SHA-256 over every weight (HF name, dtype, shape, bytes): equal on workers that hold equal weights."""
        h = hashlib.sha256()
        for name, t in sorted(self.engine.weights.named_hf_tensors(), key=lambda x: x[0]):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def shutdown(self) -> None:
        self.engine.shutdown()


class RolloutCoordinator:
    """Drives N `RolloutWorker` actors from the trainer's process.

    It is also an "engine" for `tlt.drafter_sync.DrafterPublisher` (it has `update_drafter(drafter, version)`):
    register it there and every published drafter reaches every worker."""

    def __init__(self, workers: Sequence[Any]):
        if not workers:
            raise ValueError("a coordinator needs at least one worker")
        self.workers = list(workers)
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    @classmethod
    def create(cls, num_workers: int, model_path: str | None = None, *, num_cpus: float = 1, num_gpus: float = 0,
               scheduling_strategy: str = "SPREAD", **engine_kwargs: Any) -> RolloutCoordinator:
        """Start `num_workers` actors, each with `num_cpus` / `num_gpus` and an engine built from `model_path`
        and `engine_kwargs`; returns once every engine has loaded (a load error is raised here). SPREAD places
        the actors on as many nodes as it can."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        actor = ray.remote(RolloutWorker).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                  max_concurrency=WORKER_CONCURRENCY,
                                                  scheduling_strategy=scheduling_strategy)
        workers = [actor.remote(model_path, **engine_kwargs) for _ in range(num_workers)]
        try:
            ray.get([w.stats.remote() for w in workers])
        except Exception:
            for w in workers:
                ray.kill(w)
            raise
        return cls(workers)

    # ------------------------------------------------------------------ rollout
    def generate(self, prompts: Sequence, sampling_params: dict | None = None,
                 on_idle: Callable[[int, Any], None] | None = None, **kwargs: Any) -> list[dict]:
        """Outputs for `prompts` (texts or token-id lists), n per prompt, in input order.

        Prompts are split into contiguous shares whose sizes differ by at most one. When a worker's share
        finishes while others still run, `on_idle(index, worker)` is called on this thread (and
        `idle_workers()` lists it): the worker is free until the step ends. Other keyword arguments go to
        `Engine.generate` (return_logprob, logprob_start_len, ...)."""
        prompts = list(prompts)
        if not prompts:
            return []
        pending = {}
        for i, share in enumerate(self._shares(prompts)):
            if share:
                pending[self.workers[i].generate.remote(share, sampling_params, **kwargs)] = i
        with self._lock:
            self._busy = set(pending.values())
        results: dict[int, list[dict]] = {}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                results[i] = ray.get(done[0])
                with self._lock:
                    self._busy.discard(i)
                if pending and on_idle is not None:
                    on_idle(i, self.workers[i])
        except BaseException:
            # The step failed: do not leave the other shares generating for nobody.
            ray.get([self.workers[i].abort_all.remote() for i in pending.values()])
            raise
        finally:
            with self._lock:
                self._busy.clear()
        return [o for i in sorted(results) for o in results[i]]

    def _shares(self, prompts: list) -> list[list]:
        n = len(self.workers)
        size, extra = divmod(len(prompts), n)
        out, start = [], 0
        for i in range(n):
            end = start + size + (1 if i < extra else 0)
            out.append(prompts[start:end])
            start = end
        return out

    def idle_workers(self) -> list[int]:
        """Workers not generating a share now (all of them between rollouts); safe to call from any thread."""
        with self._lock:
            return [i for i in range(len(self.workers)) if i not in self._busy]

    # ------------------------------------------------------------------ updates
    def update_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       weight_version: str | None = None) -> str | None:
        """Send HF-named tensors (all weights or some) to every worker; returns the new weight version.

        The tensors are copied to CPU and put in the object store once; every worker reads them from there.
        Raises `BroadcastError` if any worker refused: with `succeeded` empty (a bad name, shape, dtype or a
        non-finite value), every worker still has its old weights and version."""
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        ref = ray.put([(name, t.detach().to("cpu")) for name, t in items])
        replies = self._broadcast("weight update", lambda w: w.update_weights.remote(ref, weight_version))
        return replies[0]["weight_version"]

    def update_drafter(self, drafter, version: str | None = None) -> str | None:
        """Publish a drafter (an `EagleDrafter`, or a folder every worker can read) to every worker; returns
        the drafter version they now hold. Raises `BroadcastError` as `update_weights`."""
        ref = ray.put(drafter)
        replies = self._broadcast("drafter update", lambda w: w.update_drafter.remote(ref, version))
        return replies[0]["drafter_version"]

    def _broadcast(self, what: str, call: Callable[[Any], Any]) -> list[dict]:
        refs = [call(w) for w in self.workers]
        replies, failed = [], {}
        for i, ref in enumerate(refs):
            try:
                reply = ray.get(ref)
            except ray.exceptions.RayError as e:  # the worker died or raised outside the update itself
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            replies.append(reply)
            if not reply["ok"]:
                failed[i] = reply["error"]
        if failed:
            raise BroadcastError(what, failed, [i for i in range(len(refs)) if i not in failed])
        return replies

    # ------------------------------------------------------------------ status
    def stats(self) -> list[dict]:
        """Each worker's `RolloutWorker.stats()`, in worker order."""
        return ray.get([w.stats.remote() for w in self.workers])

    def weights_checksums(self) -> list[str]:
        """Each worker's weight checksum: all equal when the workers hold the same policy."""
        return ray.get([w.weights_checksum.remote() for w in self.workers])

    def shutdown(self) -> None:
        """Stop every engine and kill the actors."""
        for w in self.workers:
            try:
                ray.get(w.shutdown.remote())
            except ray.exceptions.RayError:
                pass  # already dead: nothing left to stop
            ray.kill(w)
