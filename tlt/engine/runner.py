"""One forward pass of the target model: prefill of new prompts, or one decode step for the batch."""

from __future__ import annotations

import torch

from tlt.engine.kv_cache import KVCache
from tlt.engine.models.decoder import AttentionBatch, DecoderLM


class ModelRunner:
    """Turns lists of sequences into tensors, runs the model, returns hidden states."""

    def __init__(self, model: DecoderLM, kv: KVCache, device):
        self.model = model
        self.kv = kv
        self.device = torch.device(device)

    def _batch(self, row_start: int, positions: torch.Tensor, mask: torch.Tensor, kv_len: int) -> AttentionBatch:
        B, T = positions.shape
        rows = torch.arange(row_start, row_start + B, device=self.device).unsqueeze(1).expand(B, T)
        return AttentionBatch(row_start, positions, mask, kv_len, rows)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], row_start: int, capture_layers=()):
        """Prompts of rows [row_start, row_start + B), right-padded -> hidden [B, T, H] (+ captured)."""
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        T = int(lens.max())
        ids = torch.zeros((B, T), dtype=torch.int64, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
        pos = torch.arange(T, device=self.device)
        positions = pos.unsqueeze(0).expand(B, T)
        # Query t sees keys j <= t of its own prompt. Padded queries (t >= len) still see the prompt, so
        # no row of the mask is empty; their outputs are never read.
        mask = (pos.view(1, T, 1) >= pos.view(1, 1, T)) & (pos.view(1, 1, T) < lens.view(B, 1, 1))
        batch = self._batch(row_start, positions, mask.unsqueeze(1), T)
        return self.model(ids, batch, self.kv.k, self.kv.v, capture_layers)

    @torch.inference_mode()
    def decode(self, last_tokens: list[int], positions: list[int], capture_layers=()):
        """One token per running row [0, B) at its position -> hidden [B, 1, H] (+ captured)."""
        ids = torch.tensor(last_tokens, dtype=torch.int64, device=self.device).unsqueeze(1)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device).unsqueeze(1)  # [B, 1]
        kv_len = max(positions) + 1
        mask = torch.arange(kv_len, device=self.device).view(1, 1, 1, kv_len) <= pos.view(-1, 1, 1, 1)
        batch = self._batch(0, pos, mask, kv_len)
        return self.model(ids, batch, self.kv.k, self.kv.v, capture_layers)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)
