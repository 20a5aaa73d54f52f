"""EngineConfig: every engine knob in one validated object, named as SGLang's `ServerArgs`."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """Settings fixed for an engine's life. Unknown names are rejected at construction."""

    model_path: str | None = None  # HF folder (config.json + safetensors) or .gguf; None: embedded SmolLM2
    tokenizer_path: str | None = None  # default: the model's own
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    context_length: int | None = None  # default: the model's max_position_embeddings
    kv_cache_bytes: int | None = None  # KV budget in bytes; default from mem_fraction_static / RAM
    mem_fraction_static: float = 0.85  # CUDA: fraction of free memory for weights + KV
    max_running_requests: int = 256  # sequences decoded together at most
    max_prefill_tokens: int = 8192  # padded tokens in one prefill batch (one longer prompt runs alone)
    random_seed: int | None = None
    # Batch-invariant kernels (SGLang's name): a token's logits do not depend on the other rows of its pass nor on
    # the pass's kind, so bfloat16 speculative decoding emits exactly the tokens plain decoding emits (float32 gets
    # that from its precision). bfloat16 on a CPU with AVX512-BF16 only; elsewhere a clear error.
    enable_deterministic_inference: bool = False
    # Speculative decoding (SGLang's names). algorithm: None or "EAGLE" (EAGLE3 accepted as a synonym).
    speculative_algorithm: str | None = None
    speculative_draft_model_path: str | None = None  # a drafter folder (tlt train-drafter)
    speculative_num_steps: int = 3  # draft depth
    speculative_eagle_topk: int = 1  # branching per step; 1 = chain
    speculative_num_draft_tokens: int | None = None  # tree nodes verified, root included; None: steps + 1
    # Adaptive speculation (tlt): a bandit picks per decode round among `speculative_arms` and plain
    # decoding. Arms as 's<steps>k<topk>n<draft tokens>' strings or (steps, topk, tokens); None: defaults.
    speculative_adaptive: bool = False
    speculative_arms: list | None = None
    speculative_selector: str = "epsilon_greedy"  # or "ucb"
    speculative_epsilon: float = 0.1
    # After a policy weight update: the weight kept by what the bandit learned of speculative arms, and
    # the acceptance ratio (new / before) under which speculation is suspended until a new drafter.
    speculative_update_discount: float = 0.5
    speculative_collapse_ratio: float = 0.5
    # The drafter's catch-up on tokens it has not seen (after plain rounds, a prefill or a drafter swap) feeds at
    # most this many per sequence, the newest; older positions stay invisible to the drafter's attention (the
    # target features it gets still carry them). None: all. Only draft quality depends on it, never an output.
    speculative_catchup_window: int | None = 32
    # The drafter's dtype (tlt). auto: bfloat16 beside a float32 target on a CPU whose bf16 kernels run the drafter
    # in a few C calls (half the bytes of a float32 drafter, which runs as torch ops), else the target's dtype. Only
    # the proposals depend on it: every emitted token is the target's own, in the target's dtype.
    speculative_draft_dtype: str = "auto"
    round_log_size: int = 100_000  # decode rounds kept for `get_round_log`
    weight_version: str = "default"
    torch_num_threads: int | None = None  # CPU threads for torch; default: torch's choice
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.speculative_draft_dtype != "auto" and self.speculative_draft_dtype not in _DTYPES:
            raise ValueError(f"speculative_draft_dtype must be auto or one of {sorted(_DTYPES)}, "
                             f"got {self.speculative_draft_dtype!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(self.device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError("context_length must be >= 2")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be > 0")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError("mem_fraction_static must be in (0, 1)")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.speculative_draft_model_path and self.speculative_algorithm is None:
            self.speculative_algorithm = "EAGLE"
        if self.speculative_algorithm is not None:
            if self.speculative_algorithm.upper() not in ("EAGLE", "EAGLE3"):
                raise ValueError(f"speculative_algorithm {self.speculative_algorithm!r}: only EAGLE is supported")
            if not self.speculative_draft_model_path:
                raise ValueError("speculative decoding needs speculative_draft_model_path (a drafter folder)")
            steps, k = self.speculative_num_steps, self.speculative_eagle_topk
            if steps < 1 or k < 1:
                raise ValueError("speculative_num_steps and speculative_eagle_topk must be >= 1")
            most = 1 + k + (steps - 1) * k * k
            if self.speculative_num_draft_tokens is None:
                self.speculative_num_draft_tokens = min(steps * k + 1, most)
            if not 2 <= self.speculative_num_draft_tokens <= most:
                raise ValueError(f"speculative_num_draft_tokens must be in [2, {most}] for {steps} steps, topk {k}")
        if self.speculative_adaptive:
            if self.speculative_algorithm is None:
                raise ValueError("speculative_adaptive needs speculative decoding (speculative_draft_model_path)")
            from tlt.engine.spec.selector import SelectorConfig, parse_arm

            for a in self.speculative_arms or ():
                parse_arm(a)
            SelectorConfig(self.speculative_selector, self.speculative_epsilon)
        if self.speculative_catchup_window is not None and self.speculative_catchup_window < 1:
            raise ValueError("speculative_catchup_window must be >= 1 (None: no window)")
        if not 0 <= self.speculative_update_discount <= 1 or not 0 <= self.speculative_collapse_ratio <= 1:
            raise ValueError("speculative_update_discount and speculative_collapse_ratio must be in [0, 1]")
        if self.random_seed is None:
            self.random_seed = int.from_bytes(os.urandom(4), "little")

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    def torch_dtype(self, model_dtype: torch.dtype | None) -> torch.dtype:
        """The compute dtype: explicit, else the checkpoint's (float16/bfloat16/float32), else bfloat16."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if model_dtype in (torch.float16, torch.bfloat16, torch.float32):
            return model_dtype
        return torch.bfloat16

    def drafter_torch_dtype(self, target: torch.dtype, bf16_drafter_is_fast: bool) -> torch.dtype:
        """`speculative_draft_dtype`; auto: bfloat16 beside a float32 target where `bf16_drafter_is_fast` (the
        drafter then serves in a few C calls), else the target's dtype."""
        if self.speculative_draft_dtype != "auto":
            return _DTYPES[self.speculative_draft_dtype]
        return torch.bfloat16 if target == torch.float32 and bf16_drafter_is_fast else target

    def default_kv_bytes(self, weight_bytes: int) -> int:
        """KV budget when none is given: a fraction of device memory left after the weights."""
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        if torch.device(self.device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            return max(int(free * self.mem_fraction_static) - weight_bytes, 1 << 26)
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 8 << 30
        return min(total // 4, 8 << 30)
