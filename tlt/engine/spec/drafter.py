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
from tlt.engine.models.decoder import (
    AMX_HEAD_ROWS,
    ATTENTION_KERNEL_T,
    LINEAR_AMX,
    AttentionBatch,
    DecoderLayer,
    Linear,
    RMSNorm,
    bf16_linear,
    bf16_linear_kind,
    c_layer_plan,
    c_layer_pointers,
    check_kv_writes,
    cpu_fp32,
    cpu_packing_supported,
)
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
        self._fused: list[tuple] | None = None  # set by pack_weights for `serve`
        self._c_layers: list[tuple] | None = None

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
        # `serve`: each layer as one C call (kernels.decoder_layer), the norms and the head on the kernels too.
        self._fused = self._c_layers = None
        if self.layers[0].fused and kernels.linear_bf16_available():
            self._fused = [layer.fused_tensors() for layer in self.layers]
            self._c_layers = [c_layer_pointers(t) for t in self._fused]

    def serve(self, token_embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
              slots: torch.Tensor, mask: torch.Tensor, kv_len: int, k_caches, v_caches, rope,
              row_start: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`forward` for a serving pass, in a handful of C calls instead of ~60 torch ops: the norms on
        `kernels.add_rms_norm`, each layer as one `kernels.decoder_layer` call, the head's float32 logits from the AMX
        kernel. The same values as `forward`, bit for bit (tests/engine/test_spec.py). positions/rows/slots [B, T]:
        rotary positions, KV rows and slots; mask bool [B, 1, T, kv_len]; rope: the target's `RotaryTable`.
        None when this pass cannot take that path (not packed for it, too many queries, a linear on oneDNN): call
        `forward` then."""
        B, T, H = token_embeds.shape
        N = B * T
        if self._c_layers is None or T > ATTENTION_KERNEL_T or not kernels.attention_available(self.layer_cfg.head_dim):
            return None
        mask = mask.reshape(B, T, kv_len)
        plan = c_layer_plan(self._fused[0], N, T, mask)
        if plan is None:
            return None
        positions, rows, slots = (t.reshape(N).contiguous() for t in (positions, rows, slots))
        check_kv_writes(rows, slots, k_caches[0])
        if int(positions.min()) < 0 or int(positions.max()) >= rope.cos.shape[0]:
            raise IndexError("position outside the rotary table")
        _, e = kernels.add_rms_norm(token_embeds.reshape(N, H).contiguous(), None, self.emb_norm.weight,
                                    self.emb_norm.eps)
        _, f = kernels.add_rms_norm(features.reshape(N, H).contiguous(), None, self.feat_norm.weight,
                                    self.feat_norm.eps)
        x = bf16_linear(torch.cat([e, f], dim=-1), self.in_proj.bf16_weights())
        delta = None
        mask = mask.contiguous()
        cfg = self.layer_cfg
        shape = (B, T, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        for ptrs, k_cache, v_cache in zip(self._c_layers, k_caches, v_caches, strict=True):
            x_out, delta_out = torch.empty_like(x), torch.empty_like(x)
            kernels.decoder_layer(shape, plan[0], plan[1], x, delta, x_out, delta_out, ptrs, rope.cos, rope.sin,
                                  positions, rows, slots, k_cache, v_cache, row_start, kv_len, mask, False)
            x, delta = x_out, delta_out
        h, normed = kernels.add_rms_norm(x, delta, self.norm.weight, self.norm.eps)  # h = x + delta, as `forward`
        weights = self.lm_head.bf16_weights()
        if bf16_linear_kind(weights, N) == LINEAR_AMX and 2 <= N <= AMX_HEAD_ROWS:
            logits = kernels.linear_amx(normed, weights[3], self.cfg.draft_vocab_size, float_out=True)
        else:
            logits = bf16_linear(normed, weights).float()
        return h.view(B, T, H), logits.view(B, T, -1)

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
