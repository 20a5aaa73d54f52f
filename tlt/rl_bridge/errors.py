"""HTTP errors and JSON bodies shared by the native and the OpenAI-compatible routes.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}` — the shape the
OpenAI SDK reads and a superset of SGLang's `{"error": {"message"}}`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import Response

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
          503: "service_unavailable", 500: "internal_error"}


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra or {}


def error_body(status: int, message: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"error": {"message": message, "type": _TYPES.get(status, "error"), "param": None, "code": status}}
    body.update(extra or {})
    return body


def _finite(obj: Any) -> Any:
    """NaN / inf -> None (as orjson, which SGLang uses): strict JSON parsers reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Compact strict JSON; non-finite floats become null."""
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class JSONResponse(Response):
    """A JSON response that never emits NaN or Infinity."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


def error_response(status: int, message: str, extra: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, extra), status_code=status, headers=headers)
