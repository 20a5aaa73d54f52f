"""A real `tlt serve` in its own process on a free loopback port, for the HTTP contract tests.

The server runs `python -m tlt.rl_bridge.http_server` (the engine gets its own process and its own torch
thread pool); tests talk to it over real HTTP. One server per test module keeps the suite fast.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# One torch thread: on a small shared CPU box a second OpenMP thread makes tiny-model steps slower.
TINY_SERVER_ARGS = ["--dtype", "float32", "--random-seed", "0", "--kv-cache-bytes", str(64 << 20),
                    "--torch-num-threads", "1", "--log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running server: its URL, its process and its log."""

    def __init__(self, model_path: str, log_dir: Path, *extra: str, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = Path(log_dir) / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "tlt.rl_bridge.http_server", "--model-path", model_path,
               "--port", str(self.port), *TINY_SERVER_ARGS, *extra]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 60), **kw)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def launch(model_path: str, log_dir: Path, *extra: str, api_key: str | None = None) -> ServerProcess:
    """Start a server and wait until /health answers."""
    server = ServerProcess(model_path, log_dir, *extra, api_key=api_key)
    server.wait_ready()
    return server


def wait_for(cond, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    """Poll `cond()` until it returns a truthy value; that value, or AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def num_requests(http: httpx.Client) -> int:
    """Running + waiting requests, read the way slime does (slime/backends/sglang_utils/server_control.py)."""
    load = http.get("/v1/loads", params={"include": "core,disagg,queues"}).json()
    return sum(x["num_running_reqs"] + x["num_waiting_reqs"] for x in load["loads"])
