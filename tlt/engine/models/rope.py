"""Rotary position embedding tables, including Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim // 2] in float32 (Llama-3 scaling applied if given)."""
    # float32 throughout, as transformers computes it: greedy parity depends on the last bit.
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


class RotaryTable:
    """cos/sin for positions [0, max_positions), looked up by position tensors of any shape."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_positions: int, device, dtype):
        inv = inverse_frequencies(head_dim, theta, scaling).to(device)
        pos = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv)  # [max_positions, head_dim // 2]
        emb = torch.cat([freqs, freqs], dim=-1)  # HF's rotate_half layout
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[*shape] positions -> cos, sin of [*shape, head_dim]."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [B, T, D] -> x rotated (HF rotate_half convention)."""
    half = x.shape[-1] // 2
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
