"""What stands between the network and the engine: API key, body limits, allowed weight folders.

The guard is a plain ASGI middleware, so it runs before FastAPI parses anything: an unauthenticated or
oversized request never reaches a handler, and a request body is read into memory only up to its limit.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Iterable

from tlt.rl_bridge.errors import ApiError, dumps, error_body

# An over-limit body is read and thrown away up to this much, so that the client sees the 413 rather than
# a connection reset; beyond it the connection is closed.
_DRAIN_LIMIT = 8 << 20


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def resolve_weight_path(path: str, roots: list[str] | None) -> str:
    """The real path of a checkpoint to load; ApiError(403) if it lies outside every allowed root.

    Symlinks are resolved first, so a link inside a root that points outside it is refused.
    """
    if not isinstance(path, str) or not path:
        raise ApiError(400, "model_path must be a non-empty string")
    if "\x00" in path:
        raise ApiError(400, "model_path contains a NUL byte")
    real = os.path.realpath(path)
    if roots is None:
        return real
    for root in roots:
        r = os.path.realpath(root)
        if os.path.commonpath([real, r]) == r:
            return real
    raise ApiError(403, f"model_path {path!r} is outside the allowed weight roots (--weight-roots)")


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class GuardMiddleware:
    """API-key check, per-path body-size limits, and a status counter for /metrics.

    `limits` maps a path to its body limit in bytes; other paths get `default_limit`.
    """

    def __init__(self, app, api_key: str | None, default_limit: int, limits: dict[str, int] | None = None,
                 open_paths: Iterable[str] = ("/health",),
                 on_response: Callable[[str, int], None] | None = None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.default_limit = default_limit
        self.limits = dict(limits or {})
        self.open_paths = frozenset(open_paths)
        self.on_response = on_response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status_holder = [0]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted, path)
        finally:
            if self.on_response is not None:
                self.on_response(path, status_holder[0])

    async def _guarded(self, scope, receive, send, path):
        if self.api_key is not None and path not in self.open_paths:
            auth = _header(scope, b"authorization") or ""
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                await _drain(receive, _DRAIN_LIMIT)
                msg = "missing or wrong API key: send 'Authorization: Bearer <key>'"
                return await _reply(send, 401, msg, [(b"www-authenticate", b"Bearer")])

        limit = self.limits.get(path, self.default_limit)
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                return await _reply(send, 400, "malformed Content-Length header")
            if declared_n > limit:
                await _drain(receive, _DRAIN_LIMIT)
                return await _reply(send, 413, f"request body of {declared_n} bytes exceeds the limit of "
                                               f"{limit} bytes for {path}")

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _drain(receive, _DRAIN_LIMIT)
                return await _reply(send, 413, f"request body exceeds the limit of {limit} bytes for {path}")
            chunks.append(body)
            if not message.get("more_body", False):
                break

        replayed = [False]

        async def replay():
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notifications

        await self.app(scope, replay, send)


async def _drain(receive, budget: int) -> None:
    """Read and discard the rest of a request body (up to `budget` bytes)."""
    seen = 0
    while seen <= budget:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _reply(send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
