"""A Python client for `tlt serve` (or any SGLang server's native API), for RL trainers.

    client = HttpClient("http://127.0.0.1:30000", api_key=KEY)
    outs = client.generate(input_ids=batch, sampling_params={"max_new_tokens": 512}, return_logprob=True)
    client.update_weights_from_tensor(policy.state_dict(), weight_version="step-7")

Weights travel as safetensors bytes (tensor_codec), never pickle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import httpx


class TltHttpError(RuntimeError):
    """The server refused a request (4xx) or failed (5xx); `status` and the server's `message`."""

    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class HttpClient:
    """Synchronous client of the native API. Thread-safe as httpx.Client is; use one per process."""

    def __init__(self, base_url: str = "http://127.0.0.1:30000", api_key: str | None = None,
                 timeout: float | None = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, trust_env=False)

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kw) -> Any:
        r = self._http.request(method, path, **kw)
        return _decode(r)

    def _post(self, path: str, payload: dict | None = None) -> Any:
        return self._request("POST", path, json=payload if payload is not None else {})

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 **kwargs) -> dict | list[dict]:
        """POST /generate: one output dict for one prompt (n=1), else a list (n per prompt, in order).

        Other keyword arguments are /generate fields (rid, logprob_start_len, top_logprobs_num, ...).
        """
        return self._post("/generate", _generate_payload(prompt, sampling_params, input_ids, return_logprob,
                                                          kwargs))

    def stream_generate(self, prompt: str | None = None, sampling_params: dict | None = None,
                        input_ids: list[int] | None = None, return_logprob: bool = False,
                        **kwargs) -> Iterator[dict]:
        """POST /generate with stream=true: yields output dicts holding everything generated so far."""
        payload = _generate_payload(prompt, sampling_params, input_ids, return_logprob, kwargs)
        payload["stream"] = True
        with self._http.stream("POST", "/generate", json=payload) as r:
            if r.status_code >= 400:
                r.read()
                _decode(r)
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"]
                    raise TltHttpError(int(err.get("code") or 500), err.get("message", ""), obj)
                yield obj

    # ------------------------------------------------------------------ weights
    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                 abort_all_requests: bool = False) -> dict:
        """Load a checkpoint folder the server can read (within its --weight-roots). Atomic."""
        return self._post("/update_weights_from_disk", {"model_path": model_path,
                                                        "weight_version": weight_version,
                                                        "abort_all_requests": abort_all_requests})

    def update_weights_from_tensor(self, named_tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
                                   weight_version: str | None = None,
                                   abort_all_requests: bool = False) -> dict:
        """Send weights (HF names -> tensors, all or some) as one safetensors body. Atomic: on any bad
        name, shape or dtype nothing changes and TltHttpError(400) is raised."""
        from tlt.rl_bridge.tensor_codec import encode_named_tensors

        params: dict[str, str] = {"abort_all_requests": "true" if abort_all_requests else "false"}
        if weight_version is not None:
            params["weight_version"] = str(weight_version)
        body = encode_named_tensors(named_tensors)
        return self._request("POST", "/update_weights_from_tensor", content=body, params=params,
                             headers={"Content-Type": "application/octet-stream"})

    def get_weight_version(self) -> str:
        return self._request("GET", "/get_weight_version")["weight_version"]

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        return self._post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})

    # ------------------------------------------------------------------ control
    def pause_generation(self, mode: str = "in_place") -> dict:
        """Stop stepping. `in_place` (this client's default) keeps requests in flight, with their KV, until
        `continue_generation`; `abort` (SGLang's server default) ends them, returning what they have."""
        return self._post("/pause_generation", {"mode": mode})

    def continue_generation(self) -> dict:
        return self._post("/continue_generation", {})

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> dict:
        return self._post("/abort_request", {"rid": rid or "", "abort_all": abort_all})

    def flush_cache(self) -> bool:
        try:
            return bool(self._post("/flush_cache").get("success"))
        except TltHttpError as e:
            if e.status == 400:
                return False
            raise

    # ------------------------------------------------------------------ status
    def get_model_info(self) -> dict:
        return self._request("GET", "/get_model_info")

    model_info = get_model_info

    def get_server_info(self) -> dict:
        return self._request("GET", "/get_server_info")

    def health(self) -> bool:
        try:
            return self._http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.25) -> None:
        """Block until /health answers 200; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.health():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not healthy after {timeout:.0f}s")
            time.sleep(interval)


def _generate_payload(prompt, sampling_params, input_ids, return_logprob, extra) -> dict:
    payload: dict[str, Any] = {"sampling_params": sampling_params or {}, "return_logprob": return_logprob}
    if prompt is not None:
        payload["text"] = prompt
    if input_ids is not None:
        payload["input_ids"] = input_ids
    payload.update({k: v for k, v in extra.items() if v is not None})
    return payload


def _decode(r: httpx.Response) -> Any:
    try:
        body = r.json() if r.content else {}
    except ValueError:
        body = r.text
    if r.status_code >= 400:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        raise TltHttpError(r.status_code, message or str(body), body)
    return body
