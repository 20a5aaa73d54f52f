"""Shared benchmark helpers: prompts, JSON output, machine description."""

from __future__ import annotations

import json
import os
import platform
import time

TOPICS = [
    "the water cycle", "prime numbers", "how a bicycle works", "the history of tea", "black holes",
    "photosynthesis", "the French revolution", "neural networks", "volcanoes", "the Roman empire",
    "how vaccines work", "climate change", "the stock market", "quantum computing", "honey bees",
    "the moon landing", "electric cars", "the printing press", "coral reefs", "the immune system",
]
# Arithmetic prompts of the speculative benchmark and `drafter_eval`: a seed no training set uses.
ARITHMETIC_SEED = 777

STYLES = ["Explain", "Write a short story about", "List three facts about", "Describe"]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """n distinct chat-templated prompts, tokenized (deterministic)."""
    out = []
    for i in range(n):
        q = f"{STYLES[i % len(STYLES)]} {TOPICS[i % len(TOPICS)]}" + ("" if i < len(TOPICS) else f" (part {i})")
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(tokenizer.encode(text))
    return out


def task_prompts(tokenizer, kind: str, count: int, arithmetic_seed: int) -> list[list[int]]:
    """`count` tokenized chat-templated prompts: 'chat' (`chat_prompts`), or 'arithmetic': the GRPO demo's word problems
    (tlt.drafter_sync.prompts, the family the drafter was trained on) drawn with `arithmetic_seed`, a seed of their
    own so that no instance was seen in training (the RL situation)."""
    if kind == "chat":
        return chat_prompts(tokenizer, count)
    from tlt.drafter_sync.prompts import arithmetic_prompts

    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                           add_generation_prompt=True))
            for q in arithmetic_prompts(count, arithmetic_seed)]


def machine() -> dict:
    import torch

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "commit": _git_commit(),
        # Other processes on the machine when the run ended (1/5/15-minute load averages).
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def free_port() -> int:
    """A free loopback TCP port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, url: str, timeout_s: float = 300.0) -> None:
    """Wait until the server child `proc` answers GET `url`/health with 200; kill it and raise if it exits
    or does not answer in `timeout_s` (its stderr tail in the error when it was piped)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr is not None else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise TimeoutError(f"server at {url} not healthy after {timeout_s:.0f} s")


def _git_commit() -> str | None:
    """The checked-out commit (+ '-dirty' with uncommitted changes to tracked files), None outside git."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def write_json(path: str | None, data: dict) -> None:
    text = json.dumps(data, indent=2)
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
