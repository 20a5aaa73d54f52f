"""KV memory: one dense row per running sequence, rows kept compact, grown within a byte budget.

Layout per layer: [rows, kv_heads, max_len, head_dim]. The running batch always occupies rows
[0, num_rows), so a decode step attends to `k[:B, :, :L]` — a strided view, no gather — and attention
work follows the longest *actual* sequence, not a fixed maximum. When a sequence leaves, the last row is
moved into its hole (one row copy). The `n` samples of a prompt are prefilled once; the prompt's K/V are
then copied into each sibling row (compute is shared, memory is not: a dense row cannot alias another).

Admission is by reservation: a sequence reserves prompt + max_new_tokens positions, so a running
sequence never runs out of room and nothing has to be preempted.
"""

from __future__ import annotations

import torch

from tlt.engine.models.model_config import ModelConfig

_LEN_ALIGN = 128
_ROW_ALIGN = 8


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class KVCache:
    """Dense per-row K/V tensors for every layer, sized on demand within `capacity_tokens`."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, capacity_bytes: int, max_rows: int,
                 max_len: int, extra_layers: int = 0, extra_dtype: torch.dtype | None = None):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        # extra_layers: the drafter's own layer(s), kept in the same rows so that moves carry them, in
        # `extra_dtype` (default: `dtype`; a bfloat16 drafter may serve a float32 target).
        self.num_layers = cfg.num_layers + extra_layers
        self.layer_dtypes = [dtype] * cfg.num_layers + [extra_dtype or dtype] * extra_layers
        per_layer = 2 * cfg.num_kv_heads * cfg.head_dim
        self.bytes_per_token = per_layer * sum(torch.empty((), dtype=d).element_size() for d in self.layer_dtypes)
        self.capacity_tokens = capacity_bytes // self.bytes_per_token
        if self.capacity_tokens < max_len:
            raise ValueError(
                f"KV budget of {capacity_bytes} bytes holds {self.capacity_tokens} tokens, less than one "
                f"full-length sequence ({max_len}); raise kv_cache_bytes or lower context_length"
            )
        self.max_rows = max_rows
        self.max_len = max_len
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.alloc_rows = 0
        self.alloc_len = 0
        self.allocations = 0  # times the tensors were (re)allocated
        self.owners: list[object] = []  # owners[row] = the Sequence in that row
        self.reserved: list[int] = []  # reserved[row] = positions that row may reach

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.owners)

    def footprint_tokens(self, rows: int, longest: int) -> int:
        """Positions the dense layout takes for `rows` rows when the longest reserves `longest`."""
        return rows * min(_round_up(max(longest, 1), _LEN_ALIGN), self.max_len)

    def reserved_tokens(self, extra_rows: int = 0, extra_len: int = 0) -> int:
        """Footprint of the dense layout if `extra_rows` rows reserving `extra_len` joined."""
        return self.footprint_tokens(self.num_rows + extra_rows, max([*self.reserved, extra_len], default=0))

    def can_admit(self, rows: int, reserve_len: int) -> bool:
        if self.num_rows + rows > self.max_rows:
            return False
        return self.reserved_tokens(rows, reserve_len) <= self.capacity_tokens

    def allocated_bytes(self) -> int:
        return self.alloc_rows * self.alloc_len * self.bytes_per_token

    def used_tokens(self) -> int:
        return sum(s.kv_len for s in self.owners)

    # ---- rows -------------------------------------------------------------------------------------
    def reserve(self, rows: int, reserve_len: int) -> None:
        """Allocate room for `rows` more rows reaching `reserve_len` at once (the caller checked
        `can_admit`), so that adding an admitted batch row by row does not grow the tensors several times
        (each growth allocates and zero-fills every layer anew: ~9% of a 64-request run, measured)."""
        self._ensure(self.num_rows + rows, max([*self.reserved, reserve_len]))

    def add(self, seq, reserve_len: int) -> int:
        """Give `seq` the next free row (the caller checked `can_admit`)."""
        row = self.num_rows
        self.owners.append(seq)
        self.reserved.append(reserve_len)
        self._ensure(self.num_rows, max(self.reserved))
        seq.row = row
        return row

    def remove(self, seq) -> None:
        """Free `seq`'s row at once, moving the last row into the hole to stay compact."""
        hole, last = seq.row, self.num_rows - 1
        if hole != last:
            moved = self.owners[last]
            n = moved.kv_len + 1  # +1: a speculative round may have written ahead; cheap to include
            n = min(n, self.alloc_len)
            for k, v in zip(self.k, self.v):
                k[hole, :, :n].copy_(k[last, :, :n])
                v[hole, :, :n].copy_(v[last, :, :n])
            self.owners[hole], self.reserved[hole] = moved, self.reserved[last]
            moved.row = hole
        self.owners.pop()
        self.reserved.pop()
        seq.row = -1

    def copy_prefix(self, src_row: int, dst_row: int, length: int) -> None:
        """Copy the first `length` positions of one row into another (sibling samples of a prompt)."""
        for k, v in zip(self.k, self.v):
            k[dst_row, :, :length].copy_(k[src_row, :, :length])
            v[dst_row, :, :length].copy_(v[src_row, :, :length])

    def clear(self) -> None:
        """Drop every row and release the memory."""
        self.owners.clear()
        self.reserved.clear()
        self.k, self.v = [], []
        self.alloc_rows = self.alloc_len = 0

    # ---- memory -----------------------------------------------------------------------------------
    def _ensure(self, rows: int, length: int) -> None:
        length = min(_round_up(length, _LEN_ALIGN), self.max_len)
        if rows <= self.alloc_rows and length <= self.alloc_len:
            return
        new_len = max(self.alloc_len, length)
        new_rows = max(self.alloc_rows, min(_round_up(rows, _ROW_ALIGN), self.max_rows))
        # Grow geometrically where the budget allows, so that growth copies are rare.
        if new_rows > self.alloc_rows and self.alloc_rows:
            new_rows = max(new_rows, min(2 * self.alloc_rows, self.max_rows))
        if new_len > self.alloc_len and self.alloc_len:
            new_len = min(max(new_len, 2 * self.alloc_len), self.max_len)
        while new_rows * new_len > self.capacity_tokens and new_rows > rows:
            new_rows -= 1
        while new_rows * new_len > self.capacity_tokens and new_len > length:
            new_len -= _LEN_ALIGN
        shape = (new_rows, self.cfg.num_kv_heads, new_len, self.cfg.head_dim)
        old_k, old_v = self.k, self.v
        self.k = [torch.zeros(shape, dtype=d, device=self.device) for d in self.layer_dtypes]
        self.v = [torch.zeros(shape, dtype=d, device=self.device) for d in self.layer_dtypes]
        if old_k:
            # A longer reservation may leave room for fewer rows than were allocated: only rows in use
            # (compact at the front, at most `rows`) have to survive.
            r, n = min(self.alloc_rows, new_rows), min(self.alloc_len, new_len)
            for dst, src in zip(self.k + self.v, old_k + old_v):
                dst[:r, :, :n].copy_(src[:r, :, :n])
        self.alloc_rows, self.alloc_len = new_rows, new_len
        self.allocations += 1
