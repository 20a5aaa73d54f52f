"""A request's state: one `Sequence` per sample, grouped by the prompt they share."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tlt.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One sample being generated. `row` is its KV-cache row while running."""

    seq_id: str
    group: RequestGroup
    sample_index: int
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    row: int = -1
    finish_reason: dict[str, Any] | None = None
    stop_text_pos: int | None = None  # where a matched stop string starts in the output text
    spec_verify_ct: int = 0
    spec_accepted_tokens: int = 0
    spec_accept_hist: list[int] = field(default_factory=list)
    # Drafter state (speculative decoding): entries in the drafter's KV, and the (token p+1, target aux
    # hidden states at p) pairs it has not consumed yet. `aux_hist` keeps the aux states of every position
    # the target processed (chunks [k, 3H]): a new drafter version rebuilds its KV from them, and they are
    # the drafter's training data. `hidden_hist`: the target's last hidden states, kept only while a
    # drafter-data sink is set (the training labels are computed from them). `draft_start`: the first position
    # the drafter attends to (a windowed catch-up skipped the ones before).
    draft_len: int = 0
    draft_start: int = 0
    pending_tokens: list[int] = field(default_factory=list)
    pending_aux: list = field(default_factory=list)
    aux_hist: list = field(default_factory=list)
    hidden_hist: list = field(default_factory=list)

    @property
    def prompt_ids(self) -> list[int]:
        return self.group.prompt_ids

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def kv_len(self) -> int:
        """Tokens whose K/V are in the cache: the prompt and all but the newest output token."""
        return len(self.group.prompt_ids) + max(len(self.output_ids) - 1, 0)

    @property
    def total_len(self) -> int:
        return len(self.group.prompt_ids) + len(self.output_ids)


@dataclass
class RequestGroup:
    """One prompt and its `n` samples; prefilled once, the samples share the prompt's KV."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # after clipping to the context window
    return_logprob: bool
    logprob_start_len: int  # -1: no prompt logprobs
    top_logprobs_num: int
    return_text_in_logprobs: bool
    stream: bool
    on_update: Callable[[RequestGroup, bool], None]  # (group, finished) -> None; called by the engine loop
    created: float = field(default_factory=time.perf_counter)
    seqs: list[Sequence] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    weight_version: str = "default"
    drafter_version: str | None = None
    aborted: bool = False
    outputs: list[dict] = field(default_factory=list)  # latest output dicts, one per sample

    @property
    def finished(self) -> bool:
        return all(s.status is SeqStatus.FINISHED for s in self.seqs)
