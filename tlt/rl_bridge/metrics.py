"""Prometheus text exposition of the engine's counters and the server's own (GET /metrics).

Names follow SGLang's (`sglang:num_running_reqs` -> `tlt:num_running_reqs`), so dashboards carry over.
Throughput is exported as counters (`rate()` them) plus a gauge averaged since the previous scrape.
"""

from __future__ import annotations

import time
from collections import Counter


class ServerMetrics:
    """Counters the engine does not keep: HTTP requests by route and status, request latencies."""

    def __init__(self, known_paths: set[str]):
        self.known_paths = known_paths
        self.http_requests: Counter[tuple[str, int]] = Counter()
        self.e2e_latency_sum = 0.0
        self.e2e_latency_count = 0
        self._last_scrape: tuple[float, int] | None = None
        self.started = time.time()

    def on_response(self, path: str, status: int) -> None:
        self.http_requests[(path if path in self.known_paths else "other", status)] += 1

    def observe_latency(self, seconds: float) -> None:
        self.e2e_latency_sum += seconds
        self.e2e_latency_count += 1

    def render(self, stats: dict, labels: dict[str, str]) -> str:
        """The exposition text for one scrape; `stats` is `Engine.get_stats()`."""
        now = time.time()
        gen = int(stats.get("generated_tokens", 0))
        t0, g0 = self._last_scrape or (self.started, 0)
        throughput = (gen - g0) / max(now - t0, 1e-9)
        self._last_scrape = (now, gen)
        lbl = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value, extra: str = "") -> None:
            if not any(line.startswith(f"# HELP tlt:{name} ") for line in lines):
                lines.append(f"# HELP tlt:{name} {help_}")
                lines.append(f"# TYPE tlt:{name} {kind}")
            all_labels = ",".join(x for x in (lbl, extra) if x)
            lines.append(f"tlt:{name}{{{all_labels}}} {float(value)!r}")

        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.get("prompt_tokens", 0))
        metric("generation_tokens_total", "counter", "Tokens generated.", gen)
        metric("num_requests_finished_total", "counter", "Requests finished normally.",
               stats.get("finished_requests", 0))
        metric("num_requests_aborted_total", "counter", "Requests aborted.", stats.get("aborted_requests", 0))
        metric("num_prefill_batches_total", "counter", "Prefill batches run.",
               stats.get("num_prefill_batches", 0))
        metric("num_decode_steps_total", "counter", "Decode steps run.", stats.get("num_decode_steps", 0))
        metric("gen_throughput", "gauge", "Tokens generated per second since the previous scrape.",
               throughput)
        metric("num_running_reqs", "gauge", "Sequences being decoded (the batch size).",
               stats.get("running", 0))
        metric("num_queue_reqs", "gauge", "Requests waiting for admission.", stats.get("waiting", 0))
        used, cap = stats.get("kv_used_tokens", 0), stats.get("kv_capacity_tokens", 0)
        metric("kv_used_tokens", "gauge", "KV-cache positions in use.", used)
        metric("kv_capacity_tokens", "gauge", "KV-cache positions the budget holds.", cap)
        metric("token_usage", "gauge", "Fraction of the KV budget in use.", used / cap if cap else 0.0)
        metric("kv_allocated_bytes", "gauge", "Bytes of KV cache allocated.",
               stats.get("kv_allocated_bytes", 0))
        metric("e2e_request_latency_seconds_sum", "counter", "Total latency of finished /generate requests.",
               self.e2e_latency_sum)
        metric("e2e_request_latency_seconds_count", "counter", "Finished /generate requests timed.",
               self.e2e_latency_count)
        rounds, accepted = stats.get("spec_verify_rounds"), stats.get("spec_accepted_tokens")
        if rounds:  # counted per sequence and round: accepted draft tokens + the target's own token
            metric("spec_accept_length", "gauge", "Tokens emitted per sequence per speculative round (mean).",
                   1 + accepted / rounds)
        for key, name, help_ in (("spec_rounds_by_arm", "spec_rounds_total", "Decode rounds by arm chosen."),
                                 ("spec_tokens_by_arm", "spec_tokens_total", "Tokens emitted by arm chosen."),
                                 ("spec_seconds_by_arm", "spec_seconds_total", "Decode seconds by arm chosen.")):
            for arm, value in sorted(stats.get(key, {}).items()):
                metric(name, "counter", help_, value, f'arm="{_escape(arm)}"')
        spec = stats.get("speculation")
        if spec:
            metric("spec_suspended", "gauge", "1 while speculation is suspended (acceptance collapsed).",
                   int(spec.get("suspended") is not None))
        for key, value in sorted(stats.items()):  # engine counters without a name above, as they come
            if key not in _NAMED_STATS and isinstance(value, (int, float)) and not isinstance(value, bool):
                metric(f"engine_{key}", "untyped", f"Engine statistic {key!r}.", value)
        for (path, status), n in sorted(self.http_requests.items()):
            metric("http_requests_total", "counter", "HTTP requests by route and status.", n,
                   f'path="{_escape(path)}",status="{status}"')
        return "\n".join(lines) + "\n"


_NAMED_STATS = frozenset({"prompt_tokens", "generated_tokens", "finished_requests", "aborted_requests",
                          "num_prefill_batches", "num_decode_steps", "running", "waiting", "kv_used_tokens",
                          "kv_capacity_tokens", "kv_allocated_bytes"})


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
