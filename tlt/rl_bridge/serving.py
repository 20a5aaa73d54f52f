"""What every route shares: the engine and server state, engine errors as HTTP errors, and awaiting a
generation while watching for the client to leave.

Threading: the Engine has no thread of its own. The server creates it on the thread that runs the event
loop, handlers are `async def` (FastAPI runs them on the loop, not in its threadpool), generation is
awaited with `Engine.async_generate` (whose driver task steps the engine on this loop), and weight
updates, aborts and flushes are called directly. So every torch operation happens on one thread, with one
OpenMP pool, and a weight update always lands between two engine steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from tlt.engine.engine import Engine, EngineError
from tlt.rl_bridge.errors import ApiError, dumps, error_body
from tlt.rl_bridge.metrics import ServerMetrics


@dataclass
class ServerOptions:
    """Settings of one HTTP app (the engine's own settings live in `Engine.config`)."""

    api_key: str | None = None
    weight_roots: list[str] | None = None  # None: any path (loopback only; `main` enforces that)
    max_request_bytes: int = 64 << 20
    max_weights_request_bytes: int = 2 << 30
    served_model_name: str | None = None
    server_args: dict[str, Any] = field(default_factory=dict)  # shown by /get_server_info (no secrets)


class ServerState:
    """The engine, the options, and what the server tracks beside the engine."""

    def __init__(self, engine: Engine, options: ServerOptions, metrics: ServerMetrics):
        self.engine = engine
        self.options = options
        self.metrics = metrics
        self.paused = False

    @property
    def model_name(self) -> str:
        return self.options.served_model_name or str(self.engine.get_model_info()["model_path"])


def as_api_error(e: BaseException) -> ApiError | None:
    """The HTTP error for an exception raised by the engine on bad input, or None for a real fault."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, EngineError):
        return ApiError(503, str(e))
    if isinstance(e, (ValueError, TypeError)):
        return ApiError(400, str(e))
    return None


def new_rid() -> str:
    return uuid.uuid4().hex


async def generate_or_abort(request: Request, engine: Engine, rids: list[str], **kwargs) -> Any:
    """Await `engine.async_generate(**kwargs)`; if the client disconnects first, abort its requests.

    `rids` are the request ids in `kwargs` (the caller assigns them so that they can be aborted).
    """
    task = asyncio.ensure_future(engine.async_generate(**kwargs))
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))  # the body is read already
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            try:
                return task.result()
            except Exception as e:  # noqa: BLE001 - mapped to 4xx/503, or re-raised as a 500
                mapped = as_api_error(e)
                if mapped is None:
                    raise
                raise mapped from None
        raise ApiError(400, "client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            for rid in rids:
                engine.abort_request(rid)


async def open_stream(engine: Engine, **kwargs) -> AsyncIterator[dict]:
    """Start a streaming generation; input errors surface here, before any byte of the response."""
    try:
        return await engine.async_generate(stream=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        mapped = as_api_error(e)
        if mapped is None:
            raise
        raise mapped from None


class EventStream(StreamingResponse):
    """Server-sent events from an async generator, stopped and closed as soon as the client leaves.

    Starlette's own disconnect handling relies on anyio cancellation, which skips a task whose awaited
    future is already done — and an engine stream always has the next chunk ready, so the cancellation
    never lands and the request keeps generating for nobody. Here a listener cancels the sending task
    with plain asyncio cancellation, and the generator is closed, which aborts the engine request.
    """

    def __init__(self, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send):
        sender = asyncio.ensure_future(self._send_all(send))
        listener = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done():
                sender.result()  # re-raise a failure of the stream itself
        finally:
            for task in (sender, listener):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self.body_iterator.aclose()

    async def _send_all(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def sse(obj: Any) -> bytes:
    """One server-sent event, as SGLang and OpenAI send them."""
    return b"data: " + dumps(obj).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(e: BaseException) -> bytes:
    mapped = as_api_error(e)
    status, message = (mapped.status, mapped.message) if mapped else (500, f"{type(e).__name__}: {e}")
    return sse(error_body(status, message))
