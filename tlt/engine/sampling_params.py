"""SGLang's sampling parameters: same names, same defaults, same meaning, validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# SGLang parameters tlt knows but does not implement. Clients often send them empty (None, [], "", {}),
# which is accepted; a non-empty value is refused rather than silently ignored.
UNSUPPORTED = (
    "regex",
    "json_schema",
    "ebnf",
    "structural_tag",
    "stop_regex",
    "custom_params",
    "logit_bias",
)


class SamplingParamsError(ValueError):
    """A sampling parameter is invalid, unknown, or not supported."""


@dataclass
class SamplingParams:
    """Per-request decoding settings (names and defaults as in SGLang's `SamplingParams`)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: int | None = None

    @classmethod
    def from_any(cls, value: SamplingParams | dict[str, Any] | None) -> SamplingParams:
        """Build from a dict as clients send it; raise SamplingParamsError on anything off."""
        if value is None:
            return cls()
        if isinstance(value, SamplingParams):
            value.validate()
            return value
        if not isinstance(value, dict):
            raise SamplingParamsError(f"sampling_params must be a dict, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, v in value.items():
            if key in UNSUPPORTED:
                if v in (None, "", [], {}):
                    continue
                raise SamplingParamsError(f"sampling parameter {key!r} is not supported by tlt")
            if key not in known:
                raise SamplingParamsError(f"unknown sampling parameter {key!r}")
            if v is None:
                continue  # SGLang clients send null for "default"
            kwargs[key] = v
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        if isinstance(kwargs.get("stop_token_ids"), int):
            kwargs["stop_token_ids"] = [kwargs["stop_token_ids"]]
        p = cls(**kwargs)
        p.validate()
        return p

    def validate(self) -> None:
        """Check types and ranges."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise SamplingParamsError(msg)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        need(is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens must be an integer >= 0")
        need(is_int(self.min_new_tokens) and self.min_new_tokens >= 0, "min_new_tokens must be an integer >= 0")
        # finite: logits / inf is 0 (or NaN where a logit is -inf, e.g. EOS banned by min_new_tokens)
        need(is_num(self.temperature) and 0 <= self.temperature < float("inf"),
             "temperature must be a finite number >= 0")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k must be -1 (all) or >= 1")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]")
        need(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty in [-2, 2]")
        need(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty in [-2, 2]")
        need(is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 2, "repetition_penalty in (0, 2]")
        need(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "stop must be a string or a list of non-empty strings")
        need(isinstance(self.stop_token_ids, list) and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be a list of token ids")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            need(isinstance(getattr(self, name), bool), f"{name} must be a boolean")
        need(is_int(self.n) and 1 <= self.n <= 1024, "n must be an integer in [1, 1024]")
        need(self.sampling_seed is None or is_int(self.sampling_seed), "sampling_seed must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1
