"""The drafter: an EAGLE-3-style single decoder layer driven by the target's hidden states.

Input at position p is the pair (token p+1, feature p). For positions the target has processed, the
feature is the target's hidden states of a low, a middle and a high layer, fused by one linear layer
(`fc`); while drafting ahead, it is the drafter's own output at the previous position. The drafter shares
the target's token embedding and predicts over a reduced vocabulary (the most frequent target tokens,
`d2t` maps draft ids to target ids), so its LM head stays cheap for large vocabularies.

Saved as a folder: config.json + model.safetensors (without the shared embedding).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from tlt.engine import kernels
from tlt.engine.models.decoder import AttentionBatch, DecoderLayer, Linear, RMSNorm, cpu_fp32, cpu_packing_supported
from tlt.engine.models.model_config import ModelConfig

FORMAT = "tlt-eagle3-drafter-v1"


@dataclass
class DrafterConfig:
    """Shape of a drafter for a given target."""

    hidden_size: int
    target_vocab_size: int
    draft_vocab_size: int
    aux_layers: tuple[int, int, int]  # target layers whose outputs are fused (low, mid, high)
    version: str = "0"
    num_layers: int = 1  # decoder layers (EAGLE: 1)
    intermediate_size: int | None = None  # the layers' MLP width (None: the target's)

    def __post_init__(self):
        if self.num_layers < 1 or (self.intermediate_size is not None and self.intermediate_size < 1):
            raise ValueError(f"invalid drafter shape: {self.num_layers} layers, MLP width {self.intermediate_size}")

    @classmethod
    def for_target(cls, mc: ModelConfig, draft_vocab_size: int | None = None, num_layers: int = 1,
                   intermediate_size: int | None = None) -> DrafterConfig:
        L = mc.num_layers
        aux = (min(2, L - 1), L // 2, max(L - 3, 0))
        dv = min(draft_vocab_size or mc.vocab_size, mc.vocab_size)
        return cls(mc.hidden_size, mc.vocab_size, dv, aux, num_layers=num_layers, intermediate_size=intermediate_size)


class EagleDrafter(nn.Module):
    """Decoder layer(s) over [embedding(token); feature] -> draft logits and its own next feature."""

    def __init__(self, cfg: DrafterConfig, target: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.layer_cfg = dataclasses.replace(target, num_layers=cfg.num_layers, attention_bias=False, qk_norm=False,
                                             intermediate_size=cfg.intermediate_size or target.intermediate_size)
        self.fc = Linear(3 * H, H, bias=False)
        self.emb_norm = RMSNorm(H, target.rms_norm_eps)
        self.feat_norm = RMSNorm(H, target.rms_norm_eps)
        self.in_proj = Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(self.layer_cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(H, target.rms_norm_eps)
        self.lm_head = Linear(H, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size), persistent=True)

    def fuse(self, aux_hidden: list[torch.Tensor]) -> torch.Tensor:
        """Target hidden states of the three aux layers [..., H] x 3 -> feature [..., H]."""
        return self.fc(torch.cat(aux_hidden, dim=-1))

    def forward(self, token_embeds: torch.Tensor, features: torch.Tensor, cos, sin, k_caches, v_caches,
                batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, H] x 2 -> (output feature [B, T, H], draft logits [B, T, draft_vocab] float32).
        `k_caches`, `v_caches`: one cache per drafter layer."""
        h = self.layer_input(token_embeds, features)
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches, strict=True):
            h = layer(h, cos, sin, k_cache, v_cache, batch)
        return h, self.head(h)

    def layer_input(self, token_embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """[..., H] x 2 -> the decoder layer's input [..., H]."""
        return self.in_proj(torch.cat([self.emb_norm(token_embeds), self.feat_norm(features)], dim=-1))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Layer output [..., H] -> draft logits [..., draft_vocab] in float32."""
        return self.lm_head(self.norm(h)).float()

    def pack_weights(self) -> None:
        """Inference weight copies on CPU, as the target's (`Linear.pack`). Only for a drafter that serves:
        training reads the parameters, which packing leaves untouched."""
        w = self.fc.weight
        enabled = (cpu_packing_supported(w.dtype, w.device) or cpu_fp32(w.dtype, w.device)) and not w.requires_grad
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack(enabled)
        for layer in self.layers:
            layer.fused = enabled and w.dtype == torch.bfloat16 and kernels.available()

    def unpacked_copy(self) -> EagleDrafter:
        """A deep copy (same dtype, device, requires_grad) without the inference weight copies of `pack_weights`:
        those are derived, and oneDNN's are opaque tensors that `copy.deepcopy` cannot copy."""
        new = type(self)(copy.deepcopy(self.cfg), self.layer_cfg)
        w = self.fc.weight
        new = new.to(device=w.device, dtype=w.dtype)
        new.load_state_dict(self.state_dict())
        new.train(self.training)
        return new.requires_grad_(w.requires_grad)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        meta = {"format": FORMAT, **dataclasses.asdict(self.cfg)}
        tmp = os.path.join(path, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(path, "model.safetensors.tmp"))
        os.replace(os.path.join(path, "model.safetensors.tmp"), os.path.join(path, "model.safetensors"))
        os.replace(tmp, os.path.join(path, "config.json"))

    @classmethod
    def load(cls, path: str, target: ModelConfig, device="cpu", dtype=torch.float32) -> EagleDrafter:
        from safetensors.torch import load_file

        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"no drafter at {path!r} (config.json missing)")
        with open(cfg_path) as f:
            meta = json.load(f)
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{path!r} is not a tlt drafter folder")
        meta["aux_layers"] = tuple(meta["aux_layers"])
        cfg = DrafterConfig(**meta)
        if cfg.hidden_size != target.hidden_size or cfg.target_vocab_size != target.vocab_size:
            raise ValueError(f"drafter at {path!r} was made for another target "
                             f"(hidden {cfg.hidden_size}, vocab {cfg.target_vocab_size})")
        if max(cfg.aux_layers) >= target.num_layers:
            raise ValueError("drafter aux layers exceed the target's depth")
        model = cls(cfg, target)
        tensors = load_file(os.path.join(path, "model.safetensors"))
        # Folders written before drafters had several layers name their one layer "layer.".
        tensors = {("layers.0." + k[6:] if k.startswith("layer.") else k): v for k, v in tensors.items()}
        model.load_state_dict(tensors)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def random(cls, target: ModelConfig, seed: int = 0, draft_vocab_size: int | None = None, num_layers: int = 1,
               intermediate_size: int | None = None) -> EagleDrafter:
        """A randomly initialised drafter (tests; the start of training)."""
        g = torch.Generator().manual_seed(seed)
        model = cls(DrafterConfig.for_target(target, draft_vocab_size, num_layers, intermediate_size), target)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
        return model
