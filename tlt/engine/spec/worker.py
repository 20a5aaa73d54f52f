"""One speculative round for the running batch: catch up, draft, verify, accept.

    catch-up  the drafter consumes the (token, target feature) pairs it has not seen yet
    draft     EAGLE-2 tree expansion (topk = 1: a chain), `num_steps` deep
    verify    one target forward over all tree nodes with a tree attention mask
    accept    walk the tree: at each depth the target's own token (argmax, or its inverse-CDF draw for
              the uniform of that output position) is emitted; the walk goes on while it equals a
              child's draft token. Every emitted token is therefore exactly the token the target would
              have produced without speculation, for greedy and sampled decoding alike.

The drafter's K/V live in extra layers of the engine's KV cache (same rows), so row moves and
sibling forks carry them along.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from tlt.engine import kernels
from tlt.engine.models.decoder import AttentionBatch, DecoderLM
from tlt.engine.spec.drafter import EagleDrafter
from tlt.engine.spec.tree import DraftTree, ancestor_matrix, select_tree, tree_attention_mask


@dataclass(frozen=True)
class SpecConfig:
    """SGLang's names: draft depth, branching, nodes verified (root included)."""

    num_steps: int
    topk: int
    num_draft_tokens: int

    @property
    def margin(self) -> int:
        """KV positions a round may write beyond a row's length (tree nodes, draft slots, scratch)."""
        return max(self.num_draft_tokens, (self.num_steps - 1) * self.topk) + 2


@dataclass
class Coupling:
    """Gumbel coupling of draft proposals to the target's samples (for rows that sample).

    The engine samples every sampled row of a speculative round by Gumbel-max: the token emitted at depth
    d is argmax(target log-probs / T + g_d), with g_d drawn before the round (a pure function of the seed
    and position for `sampling_seed` rows, fresh otherwise). Proposing argmax(draft log-probs / T + g_d)
    at the same depth makes the draft equal the target's sample whenever the two distributions are close —
    unlike proposing the draft's argmax, which matches only as often as the target's sample happens to be
    its mode (rare at T = 1). Exactness is untouched: each emitted token is still the target's own
    Gumbel-max draw with noise used for nothing else that is emitted, and whether the walk reaches depth d
    depends only on the noise of depths < d.
    """

    rows: torch.Tensor  # [R] batch rows that sample
    noise: torch.Tensor  # [R, D, Vd] Gumbel noise per depth, restricted to the draft vocabulary
    inv_temp: torch.Tensor  # [R] 1 / temperature

    def perturb(self, logp: torch.Tensor, depth: int) -> torch.Tensor:
        """Draft log-probs [B, Vd] or [B, k, Vd] -> the same, sampled rows replaced by their perturbed
        log-softmax (a distribution peaked on the coupled proposal, so tree ranking still works)."""
        out = logp.clone()
        g = self.noise[:, depth]
        if logp.dim() == 3:
            g = g.unsqueeze(1)
        scale = self.inv_temp.view(-1, *([1] * (logp.dim() - 1)))
        out[self.rows] = torch.log_softmax(logp[self.rows] * scale + g, dim=-1)
        return out


class SpecWorker:
    """Drafting and verification around the target runner; sampling stays with the engine."""

    def __init__(self, model: DecoderLM, drafter: EagleDrafter, kv, catchup_window: int | None = None):
        self.model = model
        self.catchup_window = catchup_window
        self.drafter = drafter
        self.kv = kv
        self.layer = model.cfg.num_layers  # the drafter's first layer index in the KV cache
        self.drafter_layers = slice(self.layer, self.layer + drafter.cfg.num_layers)
        self.aux_layers = tuple(drafter.cfg.aux_layers)
        self.device = model.embed.weight.device
        self._ropes: dict[torch.dtype, object] = {model.rope.cos.dtype: model.rope}

    def _rope(self, dtype: torch.dtype):
        """The target's rotary table in the drafter's dtype (the same values a target of that dtype would have)."""
        if dtype not in self._ropes:
            rope = copy.copy(self.model.rope)
            rope.cos, rope.sin = rope.cos.to(dtype), rope.sin.to(dtype)
            self._ropes[dtype] = rope
        return self._ropes[dtype]

    # ------------------------------------------------------------------ catch-up
    @torch.inference_mode()
    def catch_up(self, seqs) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed each row's pending (token, target aux states) pairs; returns the last output feature [B, H]
        and draft log-probabilities [B, Vd] at each row's newest position.

        With a `catchup_window` W, a row with more than W pending pairs skips the older ones: the drafter's
        attention starts at the first pair it is fed (`draft_start`), so a switch from plain decoding to
        speculation costs at most W positions per row, not the whole backlog."""
        W = self.catchup_window
        for s in seqs:
            skip = len(s.pending_tokens) - W if W is not None else 0
            if skip > 0:
                s.pending_aux = [torch.cat(s.pending_aux, 0)[skip:]]
                s.pending_tokens = s.pending_tokens[skip:]
                s.draft_len += skip
                s.draft_start = s.draft_len
        B = len(seqs)
        m = [len(s.pending_tokens) for s in seqs]
        T = max(m)
        dev = self.device
        scratch = self.kv.alloc_len - 1
        tokens = torch.zeros((B, T), dtype=torch.int64, device=dev)
        aux = torch.zeros((B, T, 3 * self.drafter.cfg.hidden_size), dtype=self.drafter.fc.weight.dtype,
                          device=dev)  # the target's states, in the drafter's dtype
        for b, s in enumerate(seqs):
            tokens[b, : m[b]] = torch.tensor(s.pending_tokens, dtype=torch.int64)
            aux[b, : m[b]] = torch.cat(s.pending_aux, 0)
        feats = self.drafter.fc(aux)
        start = torch.tensor([s.draft_len for s in seqs], device=dev)
        first = torch.tensor([s.draft_start for s in seqs], device=dev).view(B, 1, 1)
        valid = torch.arange(T, device=dev).view(1, T) < torch.tensor(m, device=dev).view(B, 1)
        positions = start.view(B, 1) + torch.arange(T, device=dev).view(1, T)
        slots = torch.where(valid, positions, torch.full_like(positions, scratch))
        kv_len = int((start + torch.tensor(m, device=dev)).max())
        key = torch.arange(kv_len, device=dev).view(1, 1, kv_len)
        mask = ((key <= positions.view(B, T, 1)) & (key >= first)) | (~valid.view(B, T, 1) & (key == 0))
        h, logits = self._drafter_forward(tokens, feats, positions, slots, mask.unsqueeze(1), kv_len)
        last = torch.tensor([x - 1 for x in m], device=dev)
        rows = torch.arange(B, device=dev)
        for s, n in zip(seqs, m):
            s.draft_len += n
            s.pending_tokens, s.pending_aux = [], []
        return h[rows, last], torch.log_softmax(logits[rows, last], dim=-1)

    def _drafter_forward(self, tokens, feats, positions, slots, mask, kv_len):
        B, T = tokens.shape
        rows = torch.arange(B, device=self.device).view(B, 1).expand(B, T)
        dtype = self.drafter.fc.weight.dtype  # a bfloat16 drafter may serve a float32 target
        emb = self.model.embed(tokens).to(dtype)
        rope = self._rope(dtype)
        k_caches, v_caches = self.kv.k[self.drafter_layers], self.kv.v[self.drafter_layers]
        out = self.drafter.serve(emb, feats, positions, rows, slots, mask, kv_len, k_caches, v_caches, rope)
        if out is not None:
            return out
        batch = AttentionBatch(0, positions, mask, kv_len, rows, slots)
        cos, sin = rope.lookup(positions)
        return self.drafter(emb, feats, cos, sin, k_caches, v_caches, batch)

    # ------------------------------------------------------------------ draft
    @torch.inference_mode()
    def draft(self, seqs, root_h: torch.Tensor, root_logp: torch.Tensor, cfg: SpecConfig,
              coupling: Coupling | None = None) -> DraftTree:
        """EAGLE-2 expansion: each step expands the `topk` best frontier nodes into `topk` children each.

        With `coupling`, sampled rows propose by Gumbel-max with the very noise the target will sample
        with at that depth (see `Coupling`)."""
        B, k, dev = len(seqs), cfg.topk, self.device
        d2t = self.drafter.d2t
        base = torch.tensor([s.draft_len for s in seqs], device=dev)  # drafter position of depth-1 nodes
        first = torch.tensor([s.draft_start for s in seqs], device=dev).view(B, 1, 1)  # first visible position
        if coupling is not None:
            root_logp = coupling.perturb(root_logp, 0)
        # Candidates in generation order, written in place: k children of the root, then k * k per step.
        C = k + (cfg.num_steps - 1) * k * k
        cand_tok = torch.empty((B, C), dtype=torch.int64, device=dev)
        cand_score = torch.empty((B, C), dtype=root_logp.dtype, device=dev)
        cand_parent = torch.full((B, C), -1, dtype=torch.int64, device=dev)
        cand_depth = torch.ones((B, C), dtype=torch.int64, device=dev)
        cand_score[:, :k], cand_tok[:, :k] = root_logp.topk(k, dim=-1)
        frontier = torch.arange(k, device=dev).expand(B, k)  # candidate ids of the frontier
        front_h = root_h.unsqueeze(1).expand(B, k, -1)  # parent features of the frontier
        n_cand = k
        # The drafter's attention mask for every step, over the round's widest key range: each row's visible prefix,
        # then the frontier's ancestors among the nodes already run (drafter slots base + 0 .. S-1; the root's entry
        # lies in the prefix) scattered in. Keys past a query's last visible one cost the kernel nothing.
        S_max = (cfg.num_steps - 1) * k
        kv_len = int(base.max()) + S_max
        key = torch.arange(kv_len, device=dev).view(1, 1, kv_len)
        prefix = ((key < base.view(B, 1, 1)) & (key >= first)).expand(B, k, kv_len)
        node_slots = base.view(B, 1, 1) + torch.arange(S_max, device=dev).view(1, 1, S_max)
        own = torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)
        anc_slots = torch.zeros((B, k, 0), dtype=torch.bool, device=dev)
        for step in range(2, cfg.num_steps + 1):
            off = (step - 2) * k
            S = off + k
            tokens = d2t[cand_tok.gather(1, frontier)]
            positions = (base + step - 2).view(B, 1).expand(B, k)
            slots = node_slots[:, 0, off:S]
            anc_all = torch.cat([anc_slots, own], 2)  # [B, k, S]: ancestors, and each node itself
            mask = prefix.clone().scatter_(2, node_slots[:, :, :S].expand(B, k, S), anc_all).unsqueeze(1)
            h, logits = self._drafter_forward(tokens, front_h, positions, slots, mask, kv_len)
            logp = torch.log_softmax(logits, dim=-1)  # [B, k, Vd]
            if coupling is not None:  # children of depth step-1 nodes: the target samples them with noise step-1
                logp = coupling.perturb(logp, step - 1)
            c_lp, c_id = logp.topk(k, dim=-1)  # [B, k, k]
            score = (cand_score.gather(1, frontier).unsqueeze(-1) + c_lp).view(B, k * k)
            new = slice(n_cand, n_cand + k * k)
            cand_tok[:, new] = c_id.view(B, k * k)
            cand_score[:, new] = score
            cand_parent[:, new] = frontier.unsqueeze(-1).expand(B, k, k).reshape(B, k * k)
            cand_depth[:, new] = step
            # Next frontier: the k best new children; their ancestors = parent's ancestors + parent.
            best = score.topk(k, dim=-1).indices  # [B, k] in [0, k*k)
            parent_local = best // k
            anc_slots = torch.gather(anc_all, 1, parent_local.unsqueeze(-1).expand(B, k, S))
            front_h = torch.gather(h, 1, parent_local.unsqueeze(-1).expand(B, k, h.shape[-1]))
            frontier = n_cand + best
            n_cand += k * k
        tree = select_tree(d2t[cand_tok], cand_score, cand_parent, cand_depth, cfg.num_draft_tokens)
        tree.tokens[:, 0] = torch.tensor([s.output_ids[-1] for s in seqs], device=dev)
        return tree

    # ------------------------------------------------------------------ verify
    @torch.inference_mode()
    def verify(self, seqs, tree: DraftTree):
        """Target forward over the tree -> (hidden [B, N, H], aux-layer states [B, N, 3H])."""
        B, N = tree.tokens.shape
        dev = self.device
        n = torch.tensor([s.total_len - 1 for s in seqs], device=dev)  # target KV length
        anc = ancestor_matrix(tree.parent)
        kv_len = int(n.max()) + N
        mask = tree_attention_mask(n, anc, kv_len)
        positions = n.view(B, 1) + tree.depth
        slots = n.view(B, 1) + torch.arange(N, device=dev).view(1, N)
        rows = torch.arange(B, device=dev).view(B, 1).expand(B, N)
        batch = AttentionBatch(0, positions, mask, kv_len, rows, slots)
        hidden, captured = self.model(tree.tokens, batch, self.kv.k, self.kv.v, self.aux_layers)
        return hidden, torch.cat(captured, dim=-1)

    @torch.no_grad()
    def commit_path(self, seqs, paths: list[list[int]]) -> None:
        """Move the K/V of accepted tree nodes from their tree slots n + i to their positions n + depth."""
        rows, dst, src = [], [], []
        for b, (s, path) in enumerate(zip(seqs, paths)):
            n = s.total_len - 1
            for d, node in enumerate(path):
                if node != d:
                    rows.append(b)
                    dst.append(n + d)
                    src.append(n + node)
        if not rows:
            return
        r = torch.tensor(rows, device=self.device)
        d = torch.tensor(dst, device=self.device)
        s_ = torch.tensor(src, device=self.device)
        caches = self.kv.k[: self.layer] + self.kv.v[: self.layer]  # target layers only; the drafter catches up
        if self.device.type == "cpu" and kernels.available():
            kernels.kv_move(caches, r, d, s_)
            return
        for cache in caches:
            cache[r, :, d] = cache[r, :, s_]
