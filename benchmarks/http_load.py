"""Load test of `tlt serve`: concurrent streaming clients with random aborts and disconnects, loopback only.

    python -m benchmarks.http_load --json benchmarks/results/http_load.json       # 64 clients, 60 s, SmolLM2
    python -m benchmarks.http_load --url http://127.0.0.1:30000 --clients 8 --duration 5 --json ''

Without --url it starts `tlt serve` (one torch thread) on a free 127.0.0.1 port and stops it at the end. Each
client loops until the deadline: one streaming /generate with its own rid, then, at random, it reads the stream
to the end ("completed"), or sends /abort_request for its rid after k chunks and reads on to the end
("aborted"), or closes the connection after k chunks ("disconnected"). A request started before the deadline
runs to its end; every request has a time limit.

Then, once the server has drained, it checks that nothing was lost or duplicated, from both sides:
- every request ended exactly once: a completed or aborted stream ends with one `[DONE]`, its chunks each
  extend the previous one, its rid is its own, and a completed one has exactly max_new_tokens tokens;
- server counters: finished + aborted requests grew by exactly the requests sent, /generate answered 200
  exactly that often, finished >= completed and aborted >= aborted (the difference is a disconnect or an
  abort that lost the race with the last token);
- KV memory in use is back to its idle level, with nothing running or waiting, and /flush_cache (which
  refuses while a request is in flight) gives the pool's memory back.
Any breach is listed under "violations" in the JSON (and the exit status is 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

import httpx

from benchmarks.common import TOPICS, free_port, machine, wait_healthy, write_json

REQUEST_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 30.0


@dataclass
class Record:
    """One request as its client saw it."""

    rid: str
    action: str  # what the client set out to do: complete | abort | disconnect
    max_new_tokens: int
    outcome: str = ""  # completed | aborted | disconnected | error | lost
    tokens: int = 0
    chunks: int = 0
    done_markers: int = 0
    latency: float | None = None  # send -> end of stream (completed requests)
    ttft: float | None = None  # send -> first chunk
    problems: list[str] = field(default_factory=list)


@dataclass
class LoadConfig:
    clients: int = 64
    duration: float = 60.0
    min_new_tokens: int = 16
    max_new_tokens: int = 64
    p_abort: float = 0.15
    p_disconnect: float = 0.15
    seed: int = 0


# ---------------------------------------------------------------------------------------------- clients
async def _one_request(http: httpx.AsyncClient, rng: random.Random, cfg: LoadConfig) -> Record:
    n = rng.randint(cfg.min_new_tokens, cfg.max_new_tokens)
    action = rng.choices(["complete", "abort", "disconnect"],
                         [1 - cfg.p_abort - cfg.p_disconnect, cfg.p_abort, cfg.p_disconnect])[0]
    # Abort after at least one chunk (the request is then running); disconnect possibly before any.
    after = rng.randint(1 if action == "abort" else 0, n // 2)
    rec = Record(rid=f"load-{uuid.uuid4().hex}", action=action, max_new_tokens=n)
    payload = {"text": f"Tell me about {rng.choice(TOPICS)} (note {rng.randint(0, 10**6)}).", "rid": rec.rid,
               "stream": True, "sampling_params": {"max_new_tokens": n, "temperature": 0.8, "ignore_eos": True}}
    t0 = time.perf_counter()
    prev: list[int] = []
    finish = None
    async with http.stream("POST", "/generate", json=payload) as r:
        if r.status_code != 200:
            rec.outcome = "error"
            rec.problems.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            return rec
        if action == "disconnect" and after == 0:
            rec.outcome = "disconnected"
            return rec
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                rec.done_markers += 1
                continue
            obj = json.loads(data)
            if "error" in obj:
                rec.problems.append(f"error event: {obj['error']}")
                continue
            if rec.done_markers or finish is not None:
                rec.problems.append("a chunk after the end of the stream")
            ids = obj["output_ids"]
            if ids[:len(prev)] != prev or len(ids) < len(prev):
                rec.problems.append("a chunk that does not extend the previous one")
            if obj["meta_info"]["id"] != rec.rid:
                rec.problems.append(f"a chunk of another request ({obj['meta_info']['id']})")
            prev = ids
            rec.chunks += 1
            if rec.ttft is None:
                rec.ttft = time.perf_counter() - t0
            finish = obj["meta_info"]["finish_reason"]
            if finish is None and rec.chunks == after:
                if action == "disconnect":
                    rec.outcome, rec.tokens = "disconnected", len(prev)
                    return rec
                if action == "abort":
                    a = await http.post("/abort_request", json={"rid": rec.rid})
                    if a.status_code != 200:
                        rec.problems.append(f"/abort_request answered {a.status_code}")
    rec.tokens = len(prev)
    if rec.done_markers != 1:
        rec.problems.append(f"{rec.done_markers} [DONE] markers")
    kind = (finish or {}).get("type")
    if kind == "abort":
        rec.outcome = "aborted"
    elif kind in ("length", "stop"):
        rec.outcome = "completed"
        rec.latency = time.perf_counter() - t0
        if rec.tokens != n:
            rec.problems.append(f"{rec.tokens} tokens for max_new_tokens={n} (ignore_eos)")
    else:
        rec.outcome = "error"
        rec.problems.append(f"stream ended without a finish reason ({finish})")
    return rec


async def _client(http: httpx.AsyncClient, rng: random.Random, cfg: LoadConfig, deadline: float,
                  out: list[Record]) -> None:
    while time.monotonic() < deadline:
        try:
            out.append(await asyncio.wait_for(_one_request(http, rng, cfg), REQUEST_TIMEOUT_S))
        except asyncio.TimeoutError:
            out.append(Record(rid="?", action="?", max_new_tokens=0, outcome="lost",
                              problems=[f"no end of stream after {REQUEST_TIMEOUT_S:.0f} s"]))


async def _drive(url: str, cfg: LoadConfig) -> tuple[list[Record], float]:
    limits = httpx.Limits(max_connections=2 * cfg.clients, max_keepalive_connections=cfg.clients)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False) as http:
        records: list[Record] = []
        t0 = time.monotonic()
        deadline = t0 + cfg.duration
        await asyncio.gather(*(_client(http, random.Random(cfg.seed * 1000 + i), cfg, deadline, records)
                               for i in range(cfg.clients)))
        return records, time.monotonic() - t0


# ---------------------------------------------------------------------------------------------- server side
def _server_state(http: httpx.Client) -> dict:
    stats = http.get("/get_server_info").json()["internal_states"][0]
    text = http.get("/metrics").text
    m = re.search(r'^tlt:http_requests_total\{[^}]*path="/generate",status="200"\} (\S+)$', text, re.M)
    return {"finished": stats["finished_requests"], "aborted": stats["aborted_requests"],
            "running": stats["running"], "waiting": stats["waiting"], "kv_used_tokens": stats["kv_used_tokens"],
            "kv_allocated_bytes": stats["kv_allocated_bytes"], "generated_tokens": stats["generated_tokens"],
            "generate_200": int(float(m.group(1))) if m else 0}


def _drain(http: httpx.Client, before: dict, sent: int) -> dict:
    """The server state once every request sent has ended there (or after DRAIN_TIMEOUT_S)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        s = _server_state(http)
        ended = s["finished"] + s["aborted"] - before["finished"] - before["aborted"]
        if (ended >= sent and s["running"] == 0 and s["waiting"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run_load(url: str, cfg: LoadConfig) -> dict:
    """Run the load against a server at `url` and return the report (with its "violations")."""
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        warm = http.post("/generate", json={"text": "warm up", "sampling_params": {"max_new_tokens": 2}})
        warm.raise_for_status()
        info = http.get("/get_model_info").json()
        before = _server_state(http)
        records, wall = asyncio.run(_drive(url, cfg))
        after = _drain(http, before, len(records))
        # The KV pool keeps its high-water allocation; /flush_cache (refused while anything is in flight)
        # gives it back, which shows the memory itself is free, not only the counters.
        flushed = http.post("/flush_cache").status_code == 200
        allocated_after_flush = _server_state(http)["kv_allocated_bytes"]

    by = {k: [r for r in records if r.outcome == k] for k in ("completed", "aborted", "disconnected", "error", "lost")}
    d = {k: after[k] - before[k] for k in ("finished", "aborted", "generate_200", "generated_tokens")}
    violations = [f"{r.rid} ({r.action} -> {r.outcome}): {p}" for r in records for p in r.problems]
    violations += [f"{len(by[k])} requests {k}" for k in ("error", "lost") if by[k]]
    if d["finished"] + d["aborted"] != len(records):
        violations.append(f"server ended {d['finished']} + {d['aborted']} requests, clients sent {len(records)}")
    if d["generate_200"] != len(records):
        violations.append(f"server answered /generate 200 {d['generate_200']} times, clients sent {len(records)}")
    if d["finished"] < len(by["completed"]) or d["aborted"] < len(by["aborted"]):
        violations.append(f"server finished {d['finished']} / aborted {d['aborted']}, clients saw "
                          f"{len(by['completed'])} / {len(by['aborted'])}")
    if after["kv_used_tokens"] != before["kv_used_tokens"] or after["running"] or after["waiting"]:
        violations.append(f"after the load: kv_used_tokens {after['kv_used_tokens']} (idle "
                          f"{before['kv_used_tokens']}), running {after['running']}, waiting {after['waiting']}")
    if not flushed:
        violations.append("/flush_cache refused after the load: the server still holds a request")
    lat = [r.latency for r in by["completed"]]
    ttft = [r.ttft for r in records if r.ttft is not None]
    return {
        "config": asdict(cfg),
        "model": {k: info.get(k) for k in ("model_path", "model_type", "dtype", "device")},
        "requests": len(records),
        "completed": len(by["completed"]),
        "aborted": len(by["aborted"]),
        "disconnected": len(by["disconnected"]),
        "abort_lost_race": sum(r.action == "abort" and r.outcome == "completed" for r in records),
        # Disconnected requests the server aborted (the others had ended before it saw the client leave).
        "disconnects_aborted_by_server": d["aborted"] - len(by["aborted"]),
        "errors": len(by["error"]),
        "lost": len(by["lost"]),
        "wall_s": round(wall, 2),
        "latency_p50_s": _percentile(lat, 50),
        "latency_p99_s": _percentile(lat, 99),
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "client_tokens_per_s": round(sum(r.tokens for r in records) / wall, 1),
        "server_tokens_per_s": round(d["generated_tokens"] / wall, 1),
        "server_delta": d,
        "kv_used_tokens_before": before["kv_used_tokens"],
        "kv_used_tokens_after": after["kv_used_tokens"],
        "kv_allocated_bytes_before": before["kv_allocated_bytes"],
        "kv_allocated_bytes_after": after["kv_allocated_bytes"],
        "kv_allocated_bytes_after_flush": allocated_after_flush,
        "violations": violations,
    }


# ---------------------------------------------------------------------------------------------- CLI
def _start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tlt.rl_bridge.http_server", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args.dtype, "--torch-num-threads", str(args.torch_num_threads), "--log-level", "warning"]
    if args.model_path:
        cmd += ["--model-path", args.model_path]
    proc = subprocess.Popen(cmd, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    return proc, url


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (loopback); default: start one")
    p.add_argument("--model-path", default=None, help="for the started server; default: embedded SmolLM2-135M")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--torch-num-threads", type=int, default=1)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which new requests start")
    p.add_argument("--min-new-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--p-abort", type=float, default=0.15)
    p.add_argument("--p-disconnect", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/http_load.json")
    args = p.parse_args(argv)
    if args.url and httpx.URL(args.url).host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("http_load drives loopback servers only")
    cfg = LoadConfig(args.clients, args.duration, args.min_new_tokens, args.max_new_tokens, args.p_abort,
                     args.p_disconnect, args.seed)
    proc, url = (None, args.url) if args.url else _start_server(args)
    try:
        report = run_load(url, cfg)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    report["server"] = f"started, --torch-num-threads {args.torch_num_threads}" if proc else args.url
    report["machine"] = machine()
    write_json(args.json or None, report)
    if report["violations"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
