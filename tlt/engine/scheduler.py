"""Which requests run next: FIFO admission by KV reservation, prefill first, then decode the batch."""

from __future__ import annotations

from collections import deque

from tlt.engine.kv_cache import KVCache
from tlt.engine.request import RequestGroup, SeqStatus, Sequence


class Scheduler:
    """Holds waiting groups and running sequences; never touches tensors."""

    def __init__(self, kv: KVCache, max_prefill_tokens: int, context_length: int, spec_margin: int = 0):
        self.kv = kv
        self.spec_margin = spec_margin  # positions a speculative round writes beyond a row's length
        self.max_prefill_tokens = max_prefill_tokens
        self.context_length = context_length
        self.waiting: deque[RequestGroup] = deque()
        self.groups: dict[str, RequestGroup] = {}  # every unfinished group, by rid

    def reserve_len(self, group: RequestGroup) -> int:
        return min(len(group.prompt_ids) + group.max_new_tokens, self.context_length) + self.spec_margin

    def fits_ever(self, group: RequestGroup) -> bool:
        """Whether the group could run on an otherwise empty engine."""
        kv = self.kv
        n = len(group.seqs)
        return n <= kv.max_rows and kv.footprint_tokens(n, self.reserve_len(group)) <= kv.capacity_tokens

    def add(self, group: RequestGroup) -> None:
        self.waiting.append(group)
        self.groups[group.rid] = group

    @property
    def running(self) -> list[Sequence]:
        """Running sequences in cache-row order."""
        return self.kv.owners

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.kv.owners)

    def admit(self) -> list[RequestGroup]:
        """Pop the waiting groups that fit now (FIFO: the head blocks the rest), within the prefill budget.

        Only the first sequence of each group gets a row here; its siblings join after the prefill.
        """
        admitted: list[RequestGroup] = []
        rows, longest, max_prompt = 0, 0, 0
        while self.waiting:
            g = self.waiting[0]
            n = len(g.seqs)
            reserve = self.reserve_len(g)
            new_max_prompt = max(max_prompt, len(g.prompt_ids))
            if admitted and new_max_prompt * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            if not self.kv.can_admit(rows + n, max(longest, reserve)):
                break
            self.waiting.popleft()
            admitted.append(g)
            rows += n
            longest = max(longest, reserve)
            max_prompt = new_max_prompt
        if admitted:
            self.kv.reserve(rows, longest)  # every row of the batch, siblings included, in one allocation
        for g in admitted:
            s = g.seqs[0]
            self.kv.add(s, self.reserve_len(g))
            s.status = SeqStatus.RUNNING
        return admitted

    def fork_siblings(self, group: RequestGroup) -> None:
        """Give the other samples of a prefilled group their rows, with the prompt's K/V copied in."""
        first = group.seqs[0]
        for s in group.seqs[1:]:
            self.kv.add(s, self.reserve_len(group))
            self.kv.copy_prefix(first.row, s.row, len(group.prompt_ids))
            s.status = SeqStatus.RUNNING

    def finish(self, seq: Sequence, reason: dict) -> None:
        """Mark finished and free its row at once."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.row >= 0:
            self.kv.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq.group.finished:
            self.groups.pop(seq.group.rid, None)

    def abort(self, rid: str | None, message: str) -> list[RequestGroup]:
        """Abort one group (rid) or all (None); returns the groups aborted."""
        targets = list(self.groups.values()) if rid is None else [g for g in [self.groups.get(rid)] if g]
        for g in targets:
            if g in self.waiting:
                self.waiting.remove(g)
            g.aborted = True
            for s in g.seqs:
                self.finish(s, {"type": "abort", "message": message})
        return targets
