"""ASGI middleware of the service: a request-size limit and one JSON error shape.

BentoML answers its own errors in several shapes (a JSON list holding one object for typed
exceptions, a multi-line pydantic report for validation errors, plain text for unknown routes
and readiness). :class:`ErrorShapeMiddleware` rewrites every 4xx/5xx response body to
``{"error": "<one line>"}`` and keeps the status, so a client can rely on one form.
:class:`RequestSizeLimitMiddleware` answers 413 before reading a body that is declared too large,
and stops reading an undeclared (chunked) body once it passes the limit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.errors import PayloadTooLarge, one_line

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _json_response(status: int, message: str) -> tuple[Message, Message]:
    body = json.dumps({"error": one_line(message)}, ensure_ascii=False).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


def _validation_message(detail: list[Any]) -> str:
    """One line from pydantic's error list: ``field.path: message; …``."""
    parts = []
    for err in detail[:3]:
        if not isinstance(err, dict):
            parts.append(str(err))
            continue
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        msg = err.get("msg", "invalid value")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(detail) - 3} more)" if len(detail) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more


def error_message(body: bytes, status: int) -> str:
    """The one-line message of an error body in any of BentoML's or Starlette's shapes."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return text or f"HTTP {status}"
    if isinstance(data, list) and len(data) == 1:  # BentoML wraps typed errors in a 1-tuple
        data = data[0]
    if isinstance(data, dict):
        if isinstance(data.get("detail"), list):
            return _validation_message(data["detail"])
        for key in ("error", "detail", "message"):
            if data.get(key):
                return str(data[key])
    return str(data)


class ErrorShapeMiddleware:
    """Rewrite every error response (status >= 400) to ``{"error": "<one line>"}``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held["start"] = message
                return
            if "start" in held and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                status = held["start"]["status"]
                start, body = _json_response(status, error_message(b"".join(chunks), status))
                # keep BentoML's own headers (request id, server) but not the old body's
                start["headers"] += [
                    (k, v) for k, v in held["start"].get("headers", [])
                    if k.lower() not in (b"content-type", b"content-length")
                ]
                await send(start)
                await send(body)
                return
            await send(message)

        await self.app(scope, receive, send_wrapper)


class RequestSizeLimitMiddleware:
    """413 for request bodies above ``max_bytes`` (declared or streamed).

    Args:
        app: the wrapped ASGI app.
        max_bytes: the largest accepted body, in bytes; default ``LIPCERT_MAX_REQUEST_BYTES``
            or 32 MiB (a 64-image 3×64×64 JSON tensor is about 16 MB).
    """

    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        if max_bytes is None:
            max_bytes = int(os.environ.get("LIPCERT_MAX_REQUEST_BYTES") or 32 * 2**20)
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            start, body = _json_response(
                413, f"the request body has {int(declared)} bytes; the limit is {self.max_bytes}"
            )
            await send(start)
            await send(body)
            return
        seen = 0

        async def receive_wrapper() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # a BentoML exception, so the API wrapper answers it as a 413
                    raise PayloadTooLarge(
                        f"the request body exceeds the limit of {self.max_bytes} bytes"
                    )
            return message

        await self.app(scope, receive_wrapper, send)
