"""Engine: the public in-process API (SGLang's offline `Engine` shape) and the loop that drives it.

The loop has no thread of its own: whoever waits for results drives it — `generate` steps the engine in
the calling thread, `async_generate` runs a driver task on the caller's event loop. One lock makes every
step, weight update, abort and flush atomic with respect to the others, so a weight update always lands
between two forward passes.

Why no background thread: on CPU, torch's OpenMP pool belongs to the thread that first uses it; a second
thread doing the same work gets a second pool, and with few cores the two slow each other down by 2-3x
(measured on this project's 2-core machines). Running the engine on the thread that also trains keeps
one pool.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch

from tlt.engine import kernels, weight_sync
from tlt.engine.config import EngineConfig
from tlt.engine.detokenize import Detokenizer
from tlt.engine.kv_cache import KVCache
from tlt.engine.models.decoder import DecoderLM, batch_invariant_supported
from tlt.engine.models.model_config import ModelConfig
from tlt.engine.models.weights import (
    HFWeights,
    WeightUpdateError,
    iter_checkpoint,
    load_hf_config,
    resolve_checkpoint,
)
from tlt.engine.request import RequestGroup, SeqStatus, Sequence
from tlt.engine.runner import ModelRunner
from tlt.engine.sampling import (
    apply_penalties,
    build_sampling_batch,
    gumbel_of_states,
    sample,
    stream_states,
)
from tlt.engine.sampling_params import SamplingParams, SamplingParamsError
from tlt.engine.scheduler import Scheduler
from tlt.engine.spec.selector import arm_name
from tlt.engine.spec.worker import Coupling

logger = logging.getLogger("tlt.engine")

# SGLang `generate` arguments tlt accepts only when empty (clients send them as null / []).
_UNSUPPORTED_GENERATE_ARGS = (
    "image_data", "audio_data", "video_data", "input_embeds", "lora_path", "custom_logit_processor",
    "token_ids_logprob", "return_hidden_states", "bootstrap_host", "bootstrap_port", "bootstrap_room",
    "data_parallel_rank", "session_params",
)


class EngineError(RuntimeError):
    """The engine cannot serve a request (shut down, memory released, internal failure)."""


class Engine:
    """An inference engine for Llama-family models with continuous batching.

    `Engine()` with no model path serves the embedded SmolLM2-135M-Instruct. Keyword arguments are the
    fields of `EngineConfig` (SGLang `ServerArgs` names).
    """

    def __init__(self, model_path: str | None = None, **kwargs: Any):
        self.config = EngineConfig.from_kwargs(model_path=model_path, **kwargs)
        cfg = self.config
        logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.WARNING))
        if cfg.torch_num_threads:
            torch.set_num_threads(cfg.torch_num_threads)
        self.device = torch.device(cfg.device)
        t0 = time.perf_counter()
        self.checkpoint_kind, self.checkpoint_path = resolve_checkpoint(cfg.model_path)
        hf_config = load_hf_config(self.checkpoint_kind, self.checkpoint_path)
        self.model_config = ModelConfig.from_hf(hf_config)
        mc = self.model_config
        self.dtype = cfg.torch_dtype(getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None))
        self.context_length = cfg.context_length or mc.max_position_embeddings

        # Speculation: a static arm, or a set of arms and the bandit that picks one per decode round.
        self.spec_arms: list = []
        self.selector = None
        margin = 0
        if cfg.speculative_algorithm is not None:
            from tlt.engine.spec.selector import DEFAULT_ARMS, ArmSelector, SelectorConfig, parse_arm
            from tlt.engine.spec.worker import SpecConfig

            static = SpecConfig(cfg.speculative_num_steps, cfg.speculative_eagle_topk,
                                cfg.speculative_num_draft_tokens)
            if cfg.speculative_adaptive:
                self.spec_arms = [parse_arm(a) for a in (cfg.speculative_arms or DEFAULT_ARMS)]
                self.selector = ArmSelector(self.spec_arms, SelectorConfig(cfg.speculative_selector,
                                                                           cfg.speculative_epsilon),
                                            seed=cfg.random_seed)
                self.spec_arms = self.selector.arms
            else:
                self.spec_arms = [static]
            margin = max((a.margin for a in self.spec_arms if a is not None), default=0)
        self.spec_margin = margin
        self._spec_mode = "adaptive" if self.selector is not None else "fixed"
        self._fixed_arm = None if self.selector is not None else (self.spec_arms[0] if self.spec_arms else None)
        self.spec_suspended: str | None = None  # why speculation is off until a new drafter arrives
        with torch.device("meta"):
            model = DecoderLM(mc, max_positions=self.context_length + margin)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.weights = HFWeights(model)
        staged = self.weights.stage(iter_checkpoint(self.checkpoint_kind, self.checkpoint_path, hf_config),
                                    require_all=True)
        self.weights.commit(staged)
        del staged
        model.build_rope()
        if cfg.enable_deterministic_inference:
            if not batch_invariant_supported(self.dtype, self.device, mc.head_dim):
                raise ValueError("enable_deterministic_inference needs dtype bfloat16 on a CPU with AVX512-BF16, tlt's "
                                 f"C kernels and a head size in {kernels.ATTENTION_HEAD_DIMS} (this engine: "
                                 f"{self.dtype}, {self.device}, head size {mc.head_dim})")
            model.batch_invariant = True
        model.pack_weights()
        self.weight_version = cfg.weight_version

        self.tokenizer = self._load_tokenizer()
        self.detok = Detokenizer(self.tokenizer)
        self.eos_token_ids = self._eos_ids(hf_config)

        drafter = None
        self.drafter_dtype = self.dtype
        if cfg.speculative_algorithm is not None:
            from tlt.engine.spec.drafter import EagleDrafter

            # A bfloat16 drafter beside a float32 target where the bf16 kernels serve it (EagleDrafter.serve)
            fast = (self.device.type == "cpu" and kernels.linear_bf16_available()
                    and kernels.attention_available(mc.head_dim))
            self.drafter_dtype = cfg.drafter_torch_dtype(self.dtype, fast)
            drafter = EagleDrafter.load(cfg.speculative_draft_model_path, mc, self.device, self.drafter_dtype)
            drafter.pack_weights()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # The drafter's K/V live in extra layers of the same cache (same rows: row moves carry them).
        self.kv = KVCache(mc, self.dtype, self.device, cfg.default_kv_bytes(weight_bytes), cfg.max_running_requests,
                          self.context_length + margin, extra_layers=drafter.cfg.num_layers if margin else 0,
                          extra_dtype=self.drafter_dtype if drafter is not None else None)
        self.runner = ModelRunner(model, self.kv, self.device)
        self.scheduler = Scheduler(self.kv, cfg.max_prefill_tokens, self.context_length, margin)
        self.spec = None
        self.drafter_version = None
        if drafter is not None:
            from tlt.engine.spec.worker import SpecWorker

            self.spec = SpecWorker(model, drafter, self.kv, self.config.speculative_catchup_window)
            self.drafter_version = drafter.cfg.version
        self._drafter_sink: Callable[[dict], None] | None = None
        self._aux_layers = self.spec.aux_layers if self.spec is not None else ()
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.random_seed)
        self.load_time = time.perf_counter() - t0

        self.stats = {"num_prefill_batches": 0, "num_decode_steps": 0, "generated_tokens": 0, "prompt_tokens": 0,
                      "finished_requests": 0, "aborted_requests": 0, "spec_verify_rounds": 0,
                      "spec_accepted_tokens": 0, "spec_rounds_by_arm": {}, "spec_tokens_by_arm": {},
                      "spec_seconds_by_arm": {}, "drafter_swaps": 0, "spec_fallbacks": 0,
                      "drafter_records": 0, "drafter_sink_errors": 0, "spec_seconds_saved": 0.0}
        # One entry per decode round: (start s since engine start, arm, batch size, tokens, seconds).
        self._rounds: collections.deque = collections.deque(maxlen=cfg.round_log_size)
        self._t_origin = time.perf_counter()
        # Acceptance watch: mean accepted draft tokens per verified row over recent speculative rounds.
        self._accept_window: collections.deque = collections.deque(maxlen=64)
        self._accept_watch: float | None = None  # the pre-update mean, while watching after a policy update
        self._rid_counter = itertools.count()
        self._lock = threading.RLock()
        self._paused = False
        self._released: set[str] = set()  # memory tags released (release_memory_occupation)
        self._weights_on_host: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # CUDA, weights released
        self._weight_groups: dict[str, weight_sync.WeightsUpdateGroup] = {}
        self._stopped = False
        self._async_drivers: dict[int, asyncio.Task] = {}

    # ------------------------------------------------------------------ loading
    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        path = self.config.tokenizer_path
        if path:
            return AutoTokenizer.from_pretrained(path)
        if self.checkpoint_kind == "gguf":
            from tlt.engine.models.gguf_file import gguf_tokenizer

            return gguf_tokenizer(self.checkpoint_path)
        return AutoTokenizer.from_pretrained(self.checkpoint_path)

    def _eos_ids(self, hf_config) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if self.checkpoint_kind == "hf":
            try:
                from transformers import GenerationConfig

                gen = GenerationConfig.from_pretrained(self.checkpoint_path)
                eos = gen.eos_token_id
                ids.update(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
            except (OSError, ValueError):
                pass
        return ids

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
        **kwargs: Any,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (returns a dict) or a batch (a list: n entries per prompt, in order).

        With `stream=True` returns an iterator of output dicts whose `text` and `output_ids` hold
        everything generated so far (one prompt, n=1).
        """
        groups, single = self._make_groups(prompt, input_ids, sampling_params, return_logprob,
                                           logprob_start_len, top_logprobs_num, return_text_in_logprobs,
                                           stream, rid, kwargs)
        if stream:
            return self._stream_sync(groups)
        self._submit(groups)
        self._drive_until(lambda: all(g.finished for g in groups))
        outs = [o for g in groups for o in g.outputs]
        return outs[0] if single and len(outs) == 1 else outs

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                             logprob_start_len=None, top_logprobs_num=None, return_text_in_logprobs=False,
                             stream=False, rid=None, **kwargs):
        """`generate` for asyncio: awaits the outputs, or (stream=True) returns an async iterator."""
        groups, single = self._make_groups(prompt, input_ids, sampling_params, return_logprob,
                                           logprob_start_len, top_logprobs_num, return_text_in_logprobs,
                                           stream, rid, kwargs)
        loop = asyncio.get_running_loop()
        if stream:
            return self._stream_async(groups, loop)
        fut = loop.create_future()
        remaining = [len(groups)]

        def resolve():
            remaining[0] -= 1
            if remaining[0] == 0 and not fut.done():
                fut.set_result(None)

        def on_update(group, finished):
            if finished:
                loop.call_soon_threadsafe(resolve)

        for g in groups:
            g.on_update = on_update
        self._submit(groups)
        self._ensure_async_driver(loop)
        await fut
        outs = [o for g in groups for o in g.outputs]
        return outs[0] if single and len(outs) == 1 else outs

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Abort one request by rid, or all; their rows are freed before the next forward pass."""
        if rid is None and not abort_all:
            raise ValueError("give a rid or abort_all=True")
        self._call(lambda: self._abort(None if abort_all else rid, "aborted by request"))

    def update_weights_from_tensor(self, named_tensors, weight_version: str | None = None,
                                   flush_cache: bool = True) -> tuple[bool, str]:
        """Replace some or all weights (HF names). Atomic: on any error nothing changes and it raises."""
        if isinstance(named_tensors, dict):
            named_tensors = list(named_tensors.items())
        self._need_weights()
        staged = self.weights.stage(named_tensors)  # validation happens here, off the loop thread
        self._call(lambda: self._commit_weights(staged, weight_version))
        return True, f"updated {len(staged)} tensors"

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                 load_format: str | None = None) -> tuple[bool, str]:
        """Load every weight from a checkpoint (HF folder or GGUF). Atomic, as above."""
        if load_format not in (None, "auto"):
            raise WeightUpdateError(f"load_format {load_format!r} is not supported")
        self._need_weights()
        kind, path = resolve_checkpoint(model_path)
        hf = load_hf_config(kind, path)
        other = ModelConfig.from_hf(hf)
        # Every field that fixes how the tensors are read, not only their shapes: a checkpoint with another
        # head split (or tied vs untied embeddings) can have tensors of identical shapes.
        def layout(c: ModelConfig) -> tuple:
            return (c.num_layers, c.hidden_size, c.vocab_size, c.intermediate_size, c.num_heads,
                    c.num_kv_heads, c.head_dim, c.tie_word_embeddings, c.attention_bias, c.qk_norm)

        if layout(other) != layout(self.model_config):
            raise WeightUpdateError(f"checkpoint {model_path!r} has a different architecture")
        staged = self.weights.stage(iter_checkpoint(kind, path, hf), require_all=True)
        self._call(lambda: self._commit_weights(staged, weight_version))
        return True, f"loaded {len(staged)} tensors from {model_path}"

    def get_weights_by_name(self, name: str) -> torch.Tensor:
        """A copy of one weight under its HF name (`lm_head.weight` of a tied model is the embedding)."""
        if name == "lm_head.weight" and self.model_config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        if name not in self.weights.map:
            raise KeyError(f"unknown weight name {name!r}")
        self._need_weights()
        pname, lo, hi = self.weights.map[name]
        return self.weights.params[pname].data[lo:hi].detach().clone()

    # ------------------------------------------------------------------ weights broadcast by a trainer
    # SGLang's protocol (see weight_sync.py). Which thread does what: joining the group and receiving the
    # broadcasts block on the network, for seconds or until the trainer's timeout, so `async_...` runs the
    # receive in a worker thread and the event loop keeps stepping the engine meanwhile; it moves bytes, not
    # compute, so the one-thread rule of the module docstring holds. Validation then runs on the caller's
    # thread and the commit under the engine lock, between two engine steps, exactly as for
    # `update_weights_from_tensor`: the received tensors are the staging buffers.
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> tuple[bool, str]:
        """Join the trainer's weight-update group as rank `rank_offset` (the trainer is rank 0). Blocks until
        every rank has joined. backend: gloo (CPU) or nccl (CUDA engine)."""
        if group_name in self._weight_groups:
            raise ValueError(f"weight update group {group_name!r} exists already; destroy it first")
        group = weight_sync.join_group(group_name, backend, master_address, master_port, rank_offset, world_size,
                                       self.device)
        if self._weight_groups.setdefault(group_name, group) is not group:  # a concurrent init won
            weight_sync.leave(group)
            raise ValueError(f"weight update group {group_name!r} exists already; destroy it first")
        return True, f"joined weight update group {group_name!r} as rank {group.rank} of {world_size} ({backend})"

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "weight_update_group", weight_version: str | None = None,
                                        load_format: str | None = None) -> tuple[bool, str]:
        """Receive the tensors the trainer broadcasts (HF names; dtype names such as 'bfloat16'), then apply
        them as one atomic update. Blocks the calling thread until all have arrived.

        Every tensor is received before anything is checked, so that a refused update still lets the
        trainer's broadcasts complete; then one bad name, shape or dtype refuses the whole update and the
        weights stay bit-identical."""
        received = self._receive_weights(names, dtypes, shapes, group_name)
        return self._apply_received(received, weight_version, load_format)

    async def async_update_weights_from_distributed(self, names, dtypes, shapes, group_name="weight_update_group",
                                                    weight_version=None, load_format=None) -> tuple[bool, str]:
        """`update_weights_from_distributed` for asyncio: the receive waits in a worker thread."""
        received = await asyncio.get_running_loop().run_in_executor(
            None, self._receive_weights, names, dtypes, shapes, group_name)
        return self._apply_received(received, weight_version, load_format)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> tuple[bool, str]:
        """Leave a weight-update group (refused while it is receiving)."""
        group = self._weight_groups.get(group_name)
        if group is None:
            raise ValueError(f"no weight update group {group_name!r}")
        weight_sync.leave(group)
        del self._weight_groups[group_name]
        return True, f"destroyed weight update group {group_name!r}"

    def _receive_weights(self, names, dtypes, shapes, group_name) -> list[tuple[str, torch.Tensor]]:
        group = self._weight_groups.get(group_name)
        if group is None:
            raise ValueError(f"no weight update group {group_name!r}: call init_weights_update_group first")
        return weight_sync.receive(group, weight_sync.parse_transfer(names, dtypes, shapes))

    def _apply_received(self, received, weight_version, load_format) -> tuple[bool, str]:
        if load_format not in (None, "auto"):
            raise WeightUpdateError(f"load_format {load_format!r} is not supported")
        _, message = self.update_weights_from_tensor(received, weight_version=weight_version)
        return True, f"{message} received from the trainer"

    # ------------------------------------------------------------------ memory release
    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free memory until `resume_memory_occupation` (SGLang's tags; None: kv_cache and weights).

        - kv_cache: the KV tensors are dropped (on CUDA also handed back to the driver). After resume the
          cache grows again on demand, as after start.
        - weights: on CUDA every weight of the target and the drafter moves to pinned CPU memory and its
          GPU memory is freed; resume copies it back. On CPU the parameters are themselves the kept copy
          and stay; what is freed are the target's oneDNN pre-packed copies (bf16/fp16: as large as the
          weights), rebuilt from the parameters on resume. Weight updates are refused while weights are
          released (SGLang clients resume weights first, then update).
        - cuda_graph: accepted for SGLang clients; frees nothing (the engine captures no CUDA graphs).

        Only when no request is in flight, as in SGLang; while anything is released, generating raises
        EngineError. Releasing what is released, or resuming what is not, changes nothing.
        """
        tags = self._memory_tags(tags)

        def release():
            if self.scheduler.has_work():
                raise ValueError("requests are in flight: abort or finish them before releasing memory")
            if "kv_cache" in tags and "kv_cache" not in self._released:
                self.kv.clear()
            if "weights" in tags and "weights" not in self._released:
                self._offload_weights()
            self._released |= tags - {"cuda_graph"}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

        self._call(release)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Take back what `release_memory_occupation` freed; outputs are then those before the release."""
        tags = self._memory_tags(tags)

        def resume():
            if "weights" in tags and "weights" in self._released:
                for param, host in self._weights_on_host:
                    param.data = host.to(self.device)
                self._weights_on_host = []
                self.model.pack_weights()
            self._released -= tags

        self._call(resume)

    @property
    def released_memory(self) -> list[str]:
        """The memory tags released now (empty when the engine can generate)."""
        return sorted(self._released)

    @staticmethod
    def _memory_tags(tags: list[str] | None) -> set[str]:
        known = ("kv_cache", "weights", "cuda_graph")
        if tags is None:
            return {"kv_cache", "weights"}
        if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
            raise ValueError("tags must be a list of strings")
        unknown = sorted(set(tags) - set(known))
        if unknown:
            raise ValueError(f"unknown memory tag(s) {unknown}; known: {list(known)}")
        return set(tags)

    def _offload_weights(self) -> None:
        self.model.pack_weights(enabled=False)
        if self.device.type != "cuda":
            return
        modules = [self.model] + ([self.spec.drafter] if self.spec is not None else [])
        params = {id(p): p for m in modules for p in m.parameters()}.values()
        for p in params:
            host = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
            host.copy_(p.data)
            self._weights_on_host.append((p, host))
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def _need_weights(self) -> None:
        if "weights" in self._released:
            raise EngineError("weights are released: resume_memory_occupation(['weights']) first")

    def flush_cache(self) -> bool:
        """Drop cached KV memory; only when no request is in flight (as SGLang). Returns success."""
        return self._call(self._flush)

    def pause_generation(self) -> None:
        """Stop stepping (requests stay queued and keep their KV) until `continue_generation`."""
        self._call(lambda: setattr(self, "_paused", True))

    def continue_generation(self) -> None:
        self._call(lambda: setattr(self, "_paused", False))

    def get_model_info(self) -> dict:
        mc = self.model_config
        return {
            "model_path": self.config.model_path or self.checkpoint_path,
            "tokenizer_path": self.config.tokenizer_path or self.checkpoint_path,
            "is_generation": True,
            "model_type": mc.model_type,
            "weight_version": self.weight_version,
            "drafter_version": self.drafter_version,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "context_length": self.context_length,
            "vocab_size": mc.vocab_size,
        }

    def get_stats(self) -> dict:
        out = dict(self.stats, running=len(self.kv.owners), waiting=len(self.scheduler.waiting),
                   kv_used_tokens=self.kv.used_tokens(), kv_capacity_tokens=self.kv.capacity_tokens,
                   kv_allocated_bytes=self.kv.allocated_bytes())
        for key in ("spec_rounds_by_arm", "spec_tokens_by_arm", "spec_seconds_by_arm"):
            out[key] = dict(self.stats[key])
        if self.spec is not None:
            out["speculation"] = {"mode": self._spec_mode, "fixed_arm": arm_name(self._fixed_arm),
                                  "suspended": self.spec_suspended, "drafter_version": self.drafter_version,
                                  "arms": [arm_name(a) for a in self.spec_arms]}
            if self.selector is not None:
                out["speculation"]["estimates"] = self.selector.snapshot()
        return out

    # ------------------------------------------------------------------ speculation controls
    def set_speculation(self, mode: str) -> None:
        """'adaptive' (the bandit; needs speculative_adaptive), 'off', or one arm such as 's3k1n4', fixed
        from the next round on. The arm must fit the KV margin the engine was built with."""
        if self.spec is None:
            raise ValueError("this engine has no drafter (speculative_draft_model_path)")
        from tlt.engine.spec.selector import parse_arm

        if mode == "adaptive":
            if self.selector is None:
                raise ValueError("adaptive speculation needs an engine built with speculative_adaptive=True")
            self._call(lambda: setattr(self, "_spec_mode", "adaptive"))
            return
        arm = parse_arm(mode)
        if arm is not None and arm.margin > self.spec_margin:
            raise ValueError(f"arm {mode} needs a KV margin of {arm.margin} > the engine's {self.spec_margin}; "
                             "list it in speculative_arms at start")

        def fix():
            self._spec_mode, self._fixed_arm = "fixed", arm

        self._call(fix)

    def reset_selector(self) -> None:
        """Forget everything the adaptive bandit learned (a new task or model; a benchmark that must start
        cold). No-op without `speculative_adaptive`."""
        if self.selector is None:
            return
        from tlt.engine.spec.selector import ArmSelector

        old = self.selector
        self._call(lambda: setattr(self, "selector", ArmSelector(old.arms, old.cfg, seed=self.config.random_seed)))

    def update_drafter(self, drafter, version: str | None = None) -> None:
        """Swap in a new drafter (an `EagleDrafter` or a drafter folder) between two decode rounds.

        Running sequences keep going: the new drafter rebuilds its KV from their kept target states at its
        first round. A drafter made for another target, or with non-finite weights, is refused and the
        current one stays."""
        if self.spec is None:
            raise ValueError("this engine has no drafter (speculative_draft_model_path)")
        from tlt.engine.spec.drafter import EagleDrafter

        if isinstance(drafter, str):
            drafter = EagleDrafter.load(drafter, self.model_config, self.device, self.drafter_dtype)
        if not isinstance(drafter, EagleDrafter):
            raise TypeError(f"update_drafter takes an EagleDrafter or a folder, not {type(drafter).__name__}")
        old = self.spec.drafter.cfg
        shape = ("hidden_size", "target_vocab_size", "aux_layers", "num_layers")
        if any(tuple(getattr(drafter.cfg, a)) != tuple(getattr(old, a)) if a == "aux_layers" else
               getattr(drafter.cfg, a) != getattr(old, a) for a in shape):
            raise ValueError("the new drafter's shape (hidden size, target vocab, aux layers, layers) differs from "
                             "the engine's drafter")
        # A private copy: the caller may keep training its drafter; the engine's is frozen and packed.
        drafter = drafter.unpacked_copy().to(device=self.device, dtype=self.drafter_dtype).eval().requires_grad_(False)
        if not all(bool(torch.isfinite(p).all()) for p in drafter.parameters()):
            raise ValueError("the new drafter has non-finite weights")
        drafter.pack_weights()
        version = str(version if version is not None else drafter.cfg.version)
        drafter.cfg.version = version
        self._call(lambda: self._swap_drafter(drafter, version))

    def set_drafter_data_sink(self, sink: Callable[[dict], None] | None) -> None:
        """Hand every finished sequence to `sink` as drafter training data, from states the engine computes
        anyway: {"tokens" [m], "aux" [m, 3H] (aux-layer states), "hidden" [m, H] (last hidden states, the
        input of the LM head), "prompt_len", "weight_version"}, m = all tokens but the last. None: stop.
        The sink runs on the engine's loop: it must be quick (e.g. push into a buffer)."""
        def install():
            if sink is not None and not self._aux_layers:
                from tlt.engine.spec.drafter import DrafterConfig

                self._aux_layers = DrafterConfig.for_target(self.model_config).aux_layers
            self._drafter_sink = sink
            if sink is None and self.spec is None:
                self._aux_layers = ()

        self._call(install)

    def get_round_log(self, clear: bool = False) -> list[dict]:
        """Decode rounds (oldest first): start time (s since engine start), arm, batch size, tokens, seconds."""
        def read():
            out = [{"t": t, "arm": a, "batch_size": b, "tokens": n, "seconds": d} for t, a, b, n, d in self._rounds]
            if clear:
                self._rounds.clear()
            return out

        return self._call(read)

    def shutdown(self) -> None:
        """Abort everything in flight and stop the loop thread."""
        if self._stopped:
            return
        with self._lock:
            self._abort(None, "engine shut down")
            self._stopped = True
            self.kv.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ------------------------------------------------------------------ requests in
    def _make_groups(self, prompt, input_ids, sampling_params, return_logprob, logprob_start_len,
                     top_logprobs_num, return_text_in_logprobs, stream, rid, extra):
        for key, value in extra.items():
            if key not in _UNSUPPORTED_GENERATE_ARGS:
                raise TypeError(f"generate() got an unknown argument {key!r}")
            if value not in (None, [], "", {}, False):
                raise SamplingParamsError(f"{key!r} is not supported by tlt")
        if self._stopped:
            raise EngineError("engine is shut down")
        if self._released:
            raise EngineError(f"memory is released ({sorted(self._released)}); resume it before generating")
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt (text) or input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            texts = [prompt] if single else list(prompt)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("prompt must be a string or a list of strings")
            id_lists = [self.detok.encode(t) for t in texts]
        else:
            single = len(input_ids) == 0 or not isinstance(input_ids[0], (list, tuple))
            id_lists = [list(input_ids)] if single else [list(x) for x in input_ids]
        if not id_lists:
            raise ValueError("empty batch")
        B = len(id_lists)
        per = lambda v, name: v if isinstance(v, list) else [v] * B  # noqa: E731
        params_list = per(sampling_params, "sampling_params")
        rids = per(rid, "rid")
        if len(params_list) != B or len(rids) != B:
            raise ValueError("sampling_params and rid lists must have one entry per prompt")
        if stream and (B != 1):
            raise ValueError("stream=True takes a single prompt")
        vocab = self.model_config.vocab_size
        groups = []
        for ids, sp, r in zip(id_lists, params_list, rids):
            if not ids:
                raise ValueError("empty prompt: at least one token is needed")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("input_ids must be integers")
            bad = [t for t in ids if t < 0 or t >= vocab]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
            if len(ids) >= self.context_length:
                raise ValueError(f"prompt of {len(ids)} tokens does not fit the context length {self.context_length}")
            params = SamplingParams.from_any(sp)
            if stream and params.n != 1:
                raise ValueError("stream=True takes n=1")
            start = -1 if logprob_start_len is None else int(logprob_start_len)
            if start >= len(ids):
                raise ValueError(f"logprob_start_len {start} must be < the prompt length {len(ids)}")
            if start < -1:
                raise ValueError("logprob_start_len must be >= -1")
            top_n = int(top_logprobs_num or 0)
            if top_n < 0:
                raise ValueError("top_logprobs_num must be >= 0")
            # Checked here, not in the step: an out-of-range id or top-k there fails the whole batch.
            if top_n > vocab:
                raise ValueError(f"top_logprobs_num {top_n} exceeds the vocabulary size {vocab}")
            bad = [t for t in params.stop_token_ids if t >= vocab]
            if bad:
                raise ValueError(f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab})")
            g = RequestGroup(
                rid=str(r) if r is not None else uuid.uuid4().hex,
                prompt_ids=ids,
                params=params,
                max_new_tokens=min(params.max_new_tokens, self.context_length - len(ids)),
                return_logprob=bool(return_logprob),
                logprob_start_len=start if return_logprob else -1,
                top_logprobs_num=top_n if return_logprob else 0,
                return_text_in_logprobs=bool(return_text_in_logprobs),
                stream=stream,
                on_update=lambda g, f: None,
            )
            g.seqs = [Sequence(seq_id=g.rid if params.n == 1 else f"{g.rid}-{i}", group=g, sample_index=i)
                      for i in range(params.n)]
            if not self.scheduler.fits_ever(g):
                raise ValueError(f"request needs more KV memory than the engine has "
                                 f"(n={params.n}, {self.scheduler.reserve_len(g)} positions each)")
            groups.append(g)
        return groups, single

    def _submit(self, groups: list[RequestGroup]) -> None:
        with self._lock:
            if self._released:  # checked again here: memory may have been released since _make_groups
                raise EngineError(f"memory is released ({sorted(self._released)}); resume it before generating")
            for g in groups:
                if g.rid in self.scheduler.groups:
                    g.rid = f"{g.rid}-{next(self._rid_counter)}"  # a live rid is never shared
                self.scheduler.add(g)

    def _stream_sync(self, groups) -> Iterator[dict]:
        pending: list[tuple[dict, bool]] = []
        groups[0].on_update = lambda g, finished: pending.append((dict(g.outputs[0]), finished))
        self._submit(groups)

        def it():
            try:
                while True:
                    self._drive_until(lambda: bool(pending))
                    out, finished = pending.pop(0)
                    yield out
                    if finished:
                        return
            finally:
                if not groups[0].finished:
                    self.abort_request(groups[0].rid)

        return it()

    async def _stream_async(self, groups, loop) -> AsyncIterator[dict]:
        q: asyncio.Queue = asyncio.Queue()
        groups[0].on_update = lambda g, finished: loop.call_soon_threadsafe(
            q.put_nowait, (dict(g.outputs[0]), finished))
        self._submit(groups)
        self._ensure_async_driver(loop)
        try:
            while True:
                out, finished = await q.get()
                yield out
                if finished:
                    return
        finally:
            if not groups[0].finished:
                self.abort_request(groups[0].rid)

    # ------------------------------------------------------------------ loop thread
    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` between two forward passes (under the engine lock) and return its result."""
        if self._stopped:
            raise EngineError("engine is shut down")
        with self._lock:
            return fn()

    def step(self) -> bool:
        """Run one engine step (a prefill batch or a decode round) if there is work; True if it ran."""
        with self._lock:
            if self._stopped or self._paused or not self.scheduler.has_work():
                return False
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed step aborts its requests, not the engine
                logger.exception("engine step failed")
                self._abort(None, f"internal error: {type(e).__name__}: {e}")
            return True

    def _drive_until(self, done: Callable[[], bool]) -> None:
        """Step in the calling thread until `done()`; wait politely while paused or another thread steps."""
        while not done():
            if self._stopped:
                raise EngineError("engine is shut down")
            if not self.step():
                if done():
                    return
                time.sleep(0.005)  # paused, or another driver holds the work

    def _ensure_async_driver(self, loop: asyncio.AbstractEventLoop) -> None:
        task = self._async_drivers.get(id(loop))
        if task is None or task.done():
            self._async_drivers[id(loop)] = loop.create_task(self._async_drive())

    async def _async_drive(self) -> None:
        """Step the engine on the event loop, yielding to other tasks between steps."""
        while not self._stopped:
            if not self.step():
                if not self.scheduler.has_work():
                    return
                await asyncio.sleep(0.005)  # paused
                continue
            await asyncio.sleep(0)

    def _commit_weights(self, staged, weight_version: str | None) -> None:
        self._need_weights()  # released after the update was staged
        self.weights.commit(staged)
        self.model.pack_weights()
        if weight_version is not None:
            self.weight_version = str(weight_version)
        if self.spec is not None:  # the drafter was trained for the old policy: re-check what it is worth
            if self.selector is not None:
                self.selector.discount_speculation(self.config.speculative_update_discount)
            if len(self._accept_window) >= 8 and self._accept_watch is None:
                self._accept_watch = sum(self._accept_window) / len(self._accept_window)
            self._accept_window.clear()

    def _watch_acceptance(self, mean_accepted: float) -> None:
        """After a policy update, suspend speculation if acceptance collapsed (until a new drafter)."""
        self._accept_window.append(mean_accepted)
        if self._accept_watch is None or len(self._accept_window) < 8:
            return
        now = sum(self._accept_window) / len(self._accept_window)
        before, self._accept_watch = self._accept_watch, None
        if now < self.config.speculative_collapse_ratio * before:
            self.spec_suspended = (f"acceptance collapsed after weight update {self.weight_version}: "
                                   f"{now:.2f} accepted tokens per round vs {before:.2f} before")
            self.stats["spec_fallbacks"] += 1
            logger.warning("speculation suspended until a new drafter arrives: %s", self.spec_suspended)

    def _swap_drafter(self, drafter, version: str) -> None:
        """Between rounds: install `drafter`; every running row rebuilds its drafter KV from its history."""
        self.spec.drafter = drafter
        self.drafter_version = version
        for s in self.scheduler.running:
            s.draft_len = s.draft_start = 0
            s.pending_tokens = (s.prompt_ids + s.output_ids)[1: s.total_len]
            s.pending_aux = list(s.aux_hist)
        if self.selector is not None:
            self.selector.discount_speculation(self.config.speculative_update_discount)
        if self.spec_suspended is not None:
            logger.warning("drafter %s arrived: speculation resumes", version)
        self.spec_suspended = None
        self._accept_watch = None
        self._accept_window.clear()
        self.stats["drafter_swaps"] += 1

    def _hand_out(self, s: Sequence) -> None:
        """A finished sequence's tokens and target states -> the drafter-data sink (never raises)."""
        m = s.total_len - 1  # positions the target processed (the last token was sampled, not processed)
        if not s.aux_hist or sum(len(a) for a in s.aux_hist) != m:
            return
        record = {"tokens": torch.tensor((s.prompt_ids + s.output_ids)[:m], dtype=torch.int64),
                  "aux": torch.cat(s.aux_hist).cpu(), "hidden": torch.cat(s.hidden_hist).cpu(),
                  "prompt_len": len(s.prompt_ids), "weight_version": self.weight_version}
        try:
            self._drafter_sink(record)
            self.stats["drafter_records"] += 1
        except Exception:  # noqa: BLE001 - the drafter's data path must never break a rollout
            self.stats["drafter_sink_errors"] += 1
            logger.exception("drafter data sink failed")

    def _flush(self) -> bool:
        if self.scheduler.has_work():
            return False
        self.kv.clear()
        return True

    def _abort(self, rid: str | None, message: str) -> None:
        for g in self.scheduler.abort(rid, message):
            self.stats["aborted_requests"] += 1
            self._publish(g, finished=True)

    # ------------------------------------------------------------------ one step
    def _step(self) -> None:
        groups = self.scheduler.admit()
        if groups:
            self._prefill(groups)
        elif self.scheduler.running:
            self._decode()

    def _prefill(self, groups: list[RequestGroup]) -> None:
        row_start = groups[0].seqs[0].row
        hidden, captured = self.runner.prefill([g.prompt_ids for g in groups], row_start, self._aux_layers)
        aux = torch.cat(captured, dim=-1) if captured else None  # [B, T, 3H]: drafter inputs / data
        self.stats["num_prefill_batches"] += 1
        lens = torch.tensor([len(g.prompt_ids) for g in groups], device=self.device)
        last = hidden[torch.arange(len(groups), device=self.device), lens - 1]  # [B, H]
        logits = self.runner.logits(last)  # [B, V]
        for i, g in enumerate(groups):
            self.stats["prompt_tokens"] += len(g.prompt_ids)
            if g.logprob_start_len >= 0:
                self._prompt_logprobs(g, hidden[i])
        seqs, rows = [], []
        for i, g in enumerate(groups):
            if g.max_new_tokens == 0:  # prefill only (prompt logprobs)
                for s in g.seqs:
                    if s.row >= 0:
                        self.scheduler.finish(s, {"type": "length", "length": 0})
                    else:
                        s.status, s.finish_reason = SeqStatus.FINISHED, {"type": "length", "length": 0}
                self.scheduler.groups.pop(g.rid, None)
                self._publish(g, finished=True)
                continue
            self.scheduler.fork_siblings(g)
            seqs.extend(g.seqs)
            rows.extend([i] * len(g.seqs))
            if aux is not None:
                L = len(g.prompt_ids)
                for s in g.seqs:  # the drafter sees (token p+1, aux p) for every prompt position
                    s.draft_len = s.draft_start = 0
                    s.pending_tokens = list(g.prompt_ids[1:])
                    s.pending_aux = [aux[i, : L - 1]]
                    s.aux_hist = [aux[i, : L - 1]]  # siblings share the prompt's tensors
                    s.hidden_hist = [hidden[i, : L - 1]] if self._drafter_sink is not None else []
        if seqs:
            idx = torch.tensor(rows, device=self.device)
            node_aux = node_hidden = None
            if aux is not None:
                last_pos = torch.tensor([len(groups[i].prompt_ids) - 1 for i in rows], device=self.device)
                node_aux = aux[idx, last_pos].unsqueeze(1)  # [S, 1, 3H]
                node_hidden = hidden[idx, last_pos].unsqueeze(1)
            self._sample_and_append(seqs, logits[idx], aux=node_aux, hidden=node_hidden)

    def _decode(self) -> None:
        """One decode round for the running batch: plain, or speculative with the arm chosen for it."""
        seqs = list(self.scheduler.running)
        B = len(seqs)
        arm = self._choose_arm(B)
        t0 = time.perf_counter()
        before = self.stats["generated_tokens"]
        backlog_s = 0.0  # drafter catch-up of tokens from earlier plain rounds: a switching cost
        if arm is None:
            hidden, captured = self.runner.decode([s.output_ids[-1] for s in seqs], [s.total_len - 1 for s in seqs],
                                                  self._aux_layers)
            aux = torch.cat(captured, dim=-1) if captured else None
            self._sample_and_append(seqs, self.runner.logits(hidden[:, 0]), aux=aux, hidden=hidden)
        else:  # see spec/worker.py: catch-up, draft, verify; the walk over the tree is in _sample_and_append
            pending = max(len(s.pending_tokens) for s in seqs)
            t_cu = time.perf_counter()
            root_h, root_logp = self.spec.catch_up(seqs)
            if pending > arm.num_steps + 1:  # more than one round leaves behind
                backlog_s = (time.perf_counter() - t_cu) * (1 - (arm.num_steps + 1) / pending)
            noise = self._round_noise(seqs, arm.num_steps + 1)
            coupling = None
            if noise is not None:
                rows, states = noise
                temp = torch.tensor([seqs[r].params.temperature for r in rows.tolist()], device=self.device)
                d2t = self.spec.drafter.d2t
                g = gumbel_of_states(states.view(-1), self.model_config.vocab_size, cols=d2t)
                coupling = Coupling(rows, g.view(*states.shape, len(d2t)).to(self.device), 1.0 / temp)
            tree = self.spec.draft(seqs, root_h, root_logp, arm, coupling)
            hidden, aux = self.spec.verify(seqs, tree)
            self._sample_and_append(seqs, self.runner.logits(hidden), tree=tree, aux=aux, hidden=hidden,
                                    noise=noise)
        self.stats["num_decode_steps"] += 1
        dt = time.perf_counter() - t0
        emitted = self.stats["generated_tokens"] - before
        if self.spec is not None:
            name = arm_name(arm)
            for key, val in (("spec_rounds_by_arm", 1), ("spec_tokens_by_arm", emitted),
                             ("spec_seconds_by_arm", dt)):
                self.stats[key][name] = self.stats[key].get(name, 0) + val
            if arm is not None and self.selector is not None:
                # Time speculation saved (negative: lost) against plain decoding's median round time at this
                # batch bucket, for the same tokens per sequence; rounds where plain was not timed count 0.
                t_plain = self.selector.round_time(B, None)
                if t_plain is not None:
                    self.stats["spec_seconds_saved"] += emitted / B * t_plain - dt
            if self.selector is not None and self._spec_mode == "adaptive":  # it learns from its own picks
                # The backlog is paid once per switch to speculation, not per round: charging it to the
                # round would make every first speculative round after plain ones look slow.
                self.selector.update(B, arm, emitted, dt - backlog_s)
        self._rounds.append((t0 - self._t_origin, arm_name(arm), B, emitted, dt))

    def _round_noise(self, seqs: list[Sequence], depths: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Noise streams for the rows that sample, fixed before a speculative round so that the drafter can couple
        its proposals to them (spec/worker.py `Coupling`): (rows [R], stream states int64 [R, depths]), one
        counter-based Gumbel stream per (row, output position) (sampling.gumbel_of_states). `sampling_seed` rows
        get their seeded streams (the ones plain decoding draws from), the others streams from the engine's
        generator. Nothing vocabulary-sized is materialised: the drafter computes its vocabulary's columns, the
        target's draws fuse the noise into the argmax."""
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if not rows:
            return None
        states = torch.empty((len(rows), depths), dtype=torch.int64)
        seeded = [j for j, i in enumerate(rows) if seqs[i].params.sampling_seed is not None]
        fresh = [j for j, i in enumerate(rows) if seqs[i].params.sampling_seed is None]
        if seeded:
            keys = [(seqs[rows[j]].params.sampling_seed, seqs[rows[j]].sample_index,
                     len(seqs[rows[j]].output_ids) + d) for j in seeded for d in range(depths)]
            states[seeded] = stream_states(keys).view(len(seeded), depths)
        if fresh:  # 64 random bits per stream: a signed high half and an unsigned low half
            shape = (len(fresh), depths)
            hi = torch.randint(-(1 << 31), 1 << 31, shape, generator=self.generator, dtype=torch.int64)
            lo = torch.randint(0, 1 << 32, shape, generator=self.generator, dtype=torch.int64)
            states[fresh] = (hi << 32) | lo
        return torch.tensor(rows, device=self.device), states

    def _choose_arm(self, batch_size: int):
        """The fixed arm, or the selector's pick among the arms that fit this batch (None: plain)."""
        if self.spec is None or self.spec_suspended is not None:
            return None
        if self.selector is None or self._spec_mode == "fixed":
            return self._fixed_arm
        cap = self.config.max_prefill_tokens  # verify tokens per round: the same activation bound as prefill

        def fits(arm) -> bool:
            return arm.margin <= self.spec_margin and arm.num_draft_tokens * batch_size <= cap

        return self.selector.choose(batch_size, fits)

    def _prompt_logprobs(self, g: RequestGroup, hidden: torch.Tensor) -> None:
        """input_token_logprobs for prompt positions [start, L): position 0 has no context -> None."""
        L, start = len(g.prompt_ids), g.logprob_start_len
        first = max(start, 1)
        logits = self.runner.logits(hidden[first - 1 : L - 1])  # [L - first, V]
        t = g.params.temperature
        if not g.params.greedy and t > 0:
            logits = logits / t
        lp = torch.log_softmax(logits, dim=-1)
        ids = torch.tensor(g.prompt_ids[first:], device=self.device)
        chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
        g.input_logprobs = ([None] if start == 0 else []) + chosen
        if g.top_logprobs_num:
            v, i = lp.topk(g.top_logprobs_num, dim=-1)
            tops = [list(zip(a, b)) for a, b in zip(v.tolist(), i.tolist())]
            g.input_top_logprobs = ([None] if start == 0 else []) + tops

    # Inference mode: the runner returns inference tensors, and penalties / the min_new_tokens ban write
    # into the logits in place, which torch refuses outside inference mode.
    @torch.inference_mode()
    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor, tree=None, aux=None,
                           hidden=None, noise=None) -> None:
        """Emit tokens from the target's logits and apply stop rules.

        logits [B, V]: one token per sequence. logits [B, N, V] with a draft `tree`: walk the tree (see
        spec/worker.py) and emit every token the target itself would have produced. `aux` [B, N, 3H] and
        `hidden` [B, N, H]: the target's states at the nodes; those on the accepted path are queued for
        the drafter's catch-up and kept as drafter data. `noise` = (rows [R], stream states [R, D]): the rows
        that sample draw by Gumbel-max with the stream of each depth (a speculative round's coupled noise).
        """
        if logits.dim() == 2:
            logits = logits.unsqueeze(1)
        B, N, V = logits.shape
        dev = self.device
        params = [s.params for s in seqs]
        # Penalties and min_new_tokens depend on the emitted prefix: they are applied exactly at the root,
        # and such rows never walk into the tree (they emit one token per round, as without speculation).
        walk = [N > 1 and not p.has_penalties and len(s.output_ids) >= p.min_new_tokens
                for s, p in zip(seqs, params)]
        root = logits[:, 0]
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if pen_rows:
            apply_penalties(root, pen_rows, [s.output_ids for s in seqs], [s.prompt_ids for s in seqs], params)
        for i, s in enumerate(seqs):
            p = s.params
            if len(s.output_ids) < p.min_new_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                if banned:
                    root[i, banned] = float("-inf")
        sb = build_sampling_batch([p for p in params for _ in range(N)], self.model_config.vocab_size, dev)
        depth = tree.depth if tree is not None else torch.zeros((B, 1), dtype=torch.int64, device=dev)
        D = int(depth.max()) + 1
        # One uniform per (row, output position): nodes of equal depth share it, only one is ever emitted.
        u = torch.rand((B, D), generator=self.generator).to(dev).gather(1, depth)  # [B, N]
        # Seeded rows: a noise stream per (row, output position), fused into the draw; nodes of equal depth share
        # their position's stream. A speculative round's sampled rows come with their streams (`noise`).
        gumbel = None
        if noise is not None:  # node j of row b uses its depth's stream
            rows, states = noise
            d = depth[rows].cpu()  # [R, N]
            gumbel = ((rows.view(-1, 1) * N + torch.arange(N, device=dev)).reshape(-1),
                      states[torch.arange(len(rows)).view(-1, 1), d].reshape(-1))
        else:
            g_rows, g_keys = [], []
            depth_list = depth.tolist()
            for i, s in enumerate(seqs):
                p = s.params
                if p.sampling_seed is not None and not p.greedy:
                    for j in range(N):
                        g_rows.append(i * N + j)
                        g_keys.append((p.sampling_seed, s.sample_index, len(s.output_ids) + depth_list[i][j]))
            if g_rows:
                gumbel = (torch.tensor(g_rows, device=dev), stream_states(g_keys))
        want_lp = [b for b, s in enumerate(seqs) if s.group.return_logprob]
        tokens, logprobs = sample(logits.reshape(B * N, V), sb, u.reshape(-1), gumbel, need_logprobs=bool(want_lp))
        target = tokens.view(B, N).tolist()
        paths = [[0] for _ in range(B)]
        if tree is not None:
            draft_tok, parent = tree.tokens.tolist(), tree.parent.tolist()
            for b in range(B):
                if not walk[b]:
                    continue
                children: dict[int, list[int]] = {}
                for i in range(1, N):
                    children.setdefault(parent[b][i], []).append(i)
                cur = 0
                while True:
                    nxt = next((c for c in children.get(cur, ()) if draft_tok[b][c] == target[b][cur]), None)
                    if nxt is None:
                        break
                    paths[b].append(nxt)
                    cur = nxt
            self.spec.commit_path(seqs, paths)  # before the sequences grow: slots are relative to them
        lp_vals: dict[tuple[int, int], float] = {}
        tops: dict[tuple[int, int], list] = {}
        if want_lp:
            pairs = [(b, node) for b in want_lp for node in paths[b]]
            flat = torch.tensor([b * N + node for b, node in pairs], device=dev)
            toks = tokens[flat]
            vals = logprobs[flat].gather(1, toks.unsqueeze(1)).squeeze(1).tolist()
            lp_vals = dict(zip(pairs, vals))
            k = max(seqs[b].group.top_logprobs_num for b in want_lp)
            if k:
                v, ix = logprobs[flat].topk(k, dim=-1)
                for j, (b, node) in enumerate(pairs):
                    n = seqs[b].group.top_logprobs_num
                    tops[(b, node)] = list(zip(v[j, :n].tolist(), ix[j, :n].tolist()))
        finished: list[tuple[Sequence, dict]] = []
        emitted_total = 0
        keep_hidden = aux is not None and self._drafter_sink is not None
        if aux is not None and tree is None:  # one node per row: a view per row, one call for the batch
            row_aux = aux.unbind(0)  # [1, 3H] each
            row_hidden = hidden.unbind(0) if keep_hidden else None
        for b, s in enumerate(seqs):
            kept = 0
            reason = None
            for node in paths[b]:
                tok = target[b][node]
                s.output_ids.append(tok)
                kept += 1
                if (b, node) in lp_vals:
                    s.output_logprobs.append(lp_vals[(b, node)])
                    if s.group.top_logprobs_num:
                        s.output_top_logprobs.append(tops[(b, node)])
                reason = self._check_finish(s, tok)
                if reason is not None:
                    break
            emitted_total += kept
            if tree is not None:
                accepted = len(paths[b]) - 1
                s.spec_verify_ct += 1
                s.spec_accepted_tokens += accepted
                while len(s.spec_accept_hist) <= accepted:
                    s.spec_accept_hist.append(0)
                s.spec_accept_hist[accepted] += 1
                self.stats["spec_verify_rounds"] += 1
                self.stats["spec_accepted_tokens"] += accepted
            if aux is not None:
                if tree is None:
                    node_aux = row_aux[b]
                    if keep_hidden:
                        s.hidden_hist.append(row_hidden[b])
                else:
                    node_aux = aux[b, paths[b][:kept]]
                    if keep_hidden:
                        s.hidden_hist.append(hidden[b, paths[b][:kept]])
                s.aux_hist.append(node_aux)
                if reason is None:
                    s.pending_tokens.extend(s.output_ids[-kept:])
                    s.pending_aux.append(node_aux)
            if reason is not None:
                finished.append((s, reason))
        self.stats["generated_tokens"] += emitted_total
        if tree is not None:
            self._watch_acceptance(sum(len(p) - 1 for p in paths) / B)
        for s, reason in finished:
            self.scheduler.finish(s, reason)
            if self._drafter_sink is not None:
                self._hand_out(s)
        touched = {id(s.group): s.group for s in seqs}
        for g in touched.values():
            if g.finished:
                self.stats["finished_requests"] += 1
                self._publish(g, finished=True)
            elif g.stream:
                self._publish(g, finished=False)

    def _check_finish(self, s: Sequence, tok: int) -> dict | None:
        """SGLang's order: length, then stop token / EOS, then stop strings."""
        p, g = s.params, s.group
        if len(s.output_ids) >= g.max_new_tokens:
            return {"type": "length", "length": g.max_new_tokens}
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
            return {"type": "stop", "matched": tok}
        if p.stop:
            m = self.detok.matched_stop(s.output_ids, p.stop, max(len(x) for x in p.stop))
            if m is not None:
                return {"type": "stop", "matched": m}
        return None

    # ------------------------------------------------------------------ outputs
    def _publish(self, g: RequestGroup, finished: bool) -> None:
        g.outputs = [self._output(s) for s in g.seqs]
        if finished:  # drop the drafter state the sequences no longer need
            for s in g.seqs:
                s.pending_tokens, s.pending_aux, s.aux_hist, s.hidden_hist = [], [], [], []
        try:
            g.on_update(g, finished)
        except Exception:  # noqa: BLE001 - a consumer's failure must not stop the engine
            logger.exception("output callback failed")

    def _output(self, s: Sequence) -> dict:
        g, p = s.group, s.params
        ids = s.output_ids
        reason = s.finish_reason
        text_ids = ids
        if reason and reason.get("type") == "stop" and isinstance(reason.get("matched"), int) and not p.no_stop_trim:
            text_ids = ids[:-1]
        text = self.detok.decode(text_ids, p.skip_special_tokens, p.spaces_between_special_tokens)
        if reason and isinstance(reason.get("matched"), str) and not p.no_stop_trim:
            pos = text.find(reason["matched"])
            if pos >= 0:
                text = text[:pos]
        meta: dict[str, Any] = {
            "id": s.seq_id,
            "prompt_tokens": len(g.prompt_ids),
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "finish_reason": reason,
            "e2e_latency": time.perf_counter() - g.created,
            "weight_version": self.weight_version,
        }
        if self.spec is not None:
            meta["drafter_version"] = self.drafter_version
            meta["spec_verify_ct"] = s.spec_verify_ct
            meta["spec_accept_token_num"] = s.spec_accepted_tokens
            meta["spec_accept_histogram"] = list(s.spec_accept_hist)
        if g.return_logprob:
            texts = g.return_text_in_logprobs
            meta["output_token_logprobs"] = self._lp_tuples(s.output_logprobs, ids, texts)
            start = g.logprob_start_len
            prompt_part = g.prompt_ids[start:] if start >= 0 else []
            meta["input_token_logprobs"] = self._lp_tuples(g.input_logprobs, prompt_part, texts)
            if g.top_logprobs_num:
                meta["output_top_logprobs"] = [self._top_tuples(t, texts) for t in s.output_top_logprobs]
                meta["input_top_logprobs"] = [self._top_tuples(t, texts) for t in g.input_top_logprobs]
        return {"text": text, "output_ids": list(ids), "meta_info": meta}

    def _lp_tuples(self, lps, ids, with_text: bool) -> list[tuple]:
        texts = self.detok.token_texts(list(ids)) if with_text else [None] * len(ids)
        return [(lp, t, x) for lp, t, x in zip(lps, ids, texts)]

    def _top_tuples(self, top, with_text: bool):
        if top is None:
            return None
        texts = self.detok.token_texts([t for _, t in top]) if with_text else [None] * len(top)
        return [(lp, t, x) for (lp, t), x in zip(top, texts)]
