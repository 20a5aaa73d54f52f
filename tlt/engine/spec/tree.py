"""Draft trees: EAGLE-2-style expansion by cumulative draft probability, and the masks trees need.

A tree is given per batch row by `parent[b, i]` (index of node i's parent, -1 for the root at i = 0) with
nodes in topological order (parents first) and `depth[b, i]`. Chains are trees with topk = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """Verify-ready tree: node 0 is the root (the last emitted token, not yet in the target's KV)."""

    tokens: torch.Tensor  # [B, N] target token ids
    parent: torch.Tensor  # [B, N] int64, -1 at the root
    depth: torch.Tensor  # [B, N] int64, 0 at the root


def ancestor_matrix(parent: torch.Tensor) -> torch.Tensor:
    """[B, N] parents (topological order) -> [B, N, N] bool: anc[b, i, j] = j is i or an ancestor of i."""
    B, N = parent.shape
    anc = torch.eye(N, dtype=torch.bool, device=parent.device).repeat(B, 1, 1)
    # Climb one level per step, all nodes at once: as many steps as the tree is deep, not one per node.
    cur = torch.arange(N, device=parent.device).expand(B, N)
    for _ in range(N - 1):  # parents come first: no chain is longer
        cur = torch.where(cur >= 0, parent.gather(1, cur.clamp(min=0)), cur)
        up = cur >= 0
        if not bool(up.any()):
            break
        anc |= torch.zeros_like(anc).scatter_(2, cur.clamp(min=0).unsqueeze(-1), up.unsqueeze(-1))
    return anc


def tree_attention_mask(prefix_len: torch.Tensor, anc: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Mask [B, 1, N, kv_len] for tree nodes at slots prefix_len + i: all of the row's prefix, plus the
    node's ancestors and itself."""
    B, N, _ = anc.shape
    dev = anc.device
    slot = torch.arange(kv_len, device=dev).view(1, 1, kv_len)
    prefix = slot < prefix_len.view(B, 1, 1)  # [B, 1, L]
    rel = slot - prefix_len.view(B, 1, 1)  # [B, 1, L] node index of each slot
    in_tree = (rel >= 0) & (rel < N)
    idx = rel.clamp(0, N - 1).expand(B, N, kv_len)
    tree = torch.gather(anc, 2, idx) & in_tree
    return (prefix | tree).unsqueeze(1)


def select_tree(cand_tokens, cand_scores, cand_parent, cand_depth, num_nodes: int) -> DraftTree:
    """Pick the `num_nodes - 1` best candidates by cumulative log-probability (+ the root).

    cand_*: [B, C], candidates in generation order (so parents come before children); cand_parent
    indexes candidates, -1 for children of the root. A child never outranks its parent: scores are
    lowered by a hair per depth so that exact ties resolve parent-first, keeping the tree closed.
    """
    B, C = cand_scores.shape
    k = min(num_nodes - 1, C)
    dev = cand_scores.device
    adj = cand_scores - 1e-6 * cand_depth.to(cand_scores.dtype)
    chosen = adj.topk(k, dim=-1).indices.sort(dim=-1).values  # [B, k] candidate ids, topological
    # Map candidate id -> node index (1-based; 0 is the root).
    pos = torch.full((B, C), -1, dtype=torch.int64, device=dev)
    pos.scatter_(1, chosen, torch.arange(1, k + 1, device=dev).expand(B, k))
    par_c = cand_parent.gather(1, chosen)  # [B, k]
    par_node = torch.where(par_c < 0, torch.zeros_like(par_c), pos.gather(1, par_c.clamp(min=0)))
    tokens = cand_tokens.gather(1, chosen)
    depth = cand_depth.gather(1, chosen)
    zero = torch.zeros((B, 1), dtype=torch.int64, device=dev)
    return DraftTree(
        tokens=torch.cat([zero, tokens], 1),  # root token filled in by the caller
        parent=torch.cat([zero - 1, par_node], 1),
        depth=torch.cat([zero, depth], 1),
    )
