"""ASGI middleware of the service: request bodies checked before BentoML parses them.

BentoML answers its own errors in several shapes (a JSON list holding one object for typed
exceptions, a multi-line pydantic report for validation errors, plain text for unknown routes
and readiness). :class:`ErrorShapeMiddleware` rewrites every 4xx/5xx response body to
``{"error": "<one line>"}`` and keeps the status, so a client can rely on one form.

The others guard BentoML's parsing layer, which answers 500 to several malformed bodies (Starlette
raises ``HTTPException(400)`` for broken multipart framing, which BentoML's API wrapper does not
recognise; a text value in a file field is fetched as a URL; a deeply nested JSON form field
overflows ``json.loads``; a form field sent as a file is decoded with ``json.loads(bytes)``):

- :class:`RequestSizeLimitMiddleware` answers 413 before reading a body that is declared too
  large, and stops reading an undeclared (chunked) body once it passes the limit.
- :class:`BodyBudgetMiddleware` bounds the request bytes a worker holds at once (a byte budget
  shared by concurrent requests; a request waits for room, then 429) and how long a client may
  take to send its body (408), so slow or many large uploads cannot exhaust memory or
  connections while small requests go on.
- :class:`FormGuardMiddleware` accepts only the content types the service reads and checks a
  form body's framing and fields *while it streams* (nothing buffered beyond one text field),
  answering 400/413/415 before BentoML's parser could fail.
- :class:`OpenAPIErrorsMiddleware` adds these statuses (and 422, 503) to the OpenAPI document
  BentoML serves, which lists only 200, 400, 404 and 500.

The form checks live in ``service/form_guard.py`` and the OpenAPI completion in
``service/openapi.py``; both are re-exported here. Errors found before the app runs are answered
directly; errors found while the body streams are raised from ``receive`` as BentoML exceptions,
which BentoML's API wrapper answers with their 4xx status (the app only reads bodies inside that
wrapper, on the API routes these guard).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Collection
from typing import Any

from service.asgi import ASGIApp, Message, Receive, Scope, Send, answer, json_response
from service.errors import PayloadTooLarge, RequestTimeout, TooManyRequests
from service.form_guard import ACCEPTED_TYPES, FormGuardMiddleware, JSONDepth
from service.openapi import ERROR_STATUSES, OpenAPIErrorsMiddleware, document_errors

__all__ = [
    "ACCEPTED_TYPES", "ERROR_STATUSES", "BodyBudgetMiddleware", "ErrorShapeMiddleware",
    "FormGuardMiddleware", "JSONDepth", "OpenAPIErrorsMiddleware", "RequestSizeLimitMiddleware",
    "document_errors", "error_message",
]


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
                start, body = json_response(status, error_message(b"".join(chunks), status))
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
            start, body = json_response(
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


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when absent or not a number (chunked)."""
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyBudgetMiddleware:
    """A per-worker byte budget for request bodies in flight, and a deadline to send them.

    A request on one of ``routes`` reserves its declared Content-Length (an undeclared, chunked
    body reserves each chunk as it arrives) from a budget shared by all concurrent requests of
    the worker, and gives it back when its response is done. A request that does not fit waits
    for room; one still waiting at its deadline is answered 429. Bodies of at most
    ``small_bytes`` reserve nothing, so a burst of large uploads never holds up small requests.
    A body must have arrived within ``body_timeout_s`` of the request's start, else 408 (before
    BentoML's own 60 s timeout answers 504). The large bodies a worker holds at once are
    therefore at most ``budget`` bytes plus one request's limit; their parsed forms are a
    bounded multiple of that (docs/service.md).

    Args:
        app: the wrapped ASGI app.
        routes: the paths guarded (the API routes).
        budget_bytes: default ``LIPCERT_INFLIGHT_BYTES`` or 64 MiB.
        body_timeout_s: default ``LIPCERT_BODY_TIMEOUT_S`` or 30 s.
        small_bytes: bodies up to this size are not counted (64 KiB).
    """

    def __init__(self, app: ASGIApp, routes: Collection[str] = (),
                 budget_bytes: int | None = None, body_timeout_s: float | None = None,
                 small_bytes: int = 64 * 2**10) -> None:
        self.app = app
        self.small_bytes = small_bytes
        self.routes = frozenset(routes)
        self.budget = int(budget_bytes if budget_bytes is not None
                          else _env_number("LIPCERT_INFLIGHT_BYTES", 64 * 2**20))
        self.body_timeout_s = (body_timeout_s if body_timeout_s is not None
                               else _env_number("LIPCERT_BODY_TIMEOUT_S", 30.0))
        self.in_use = 0
        self._freed = asyncio.Event()  # set (and replaced) whenever bytes are given back

    async def _reserve(self, n: int, deadline: float) -> bool:
        """Take ``n`` bytes of the budget, waiting until ``deadline``; False if it passed.

        One event loop per worker: the check and the update below run without a suspension
        between them, so no lock is needed.
        """
        while self.in_use > 0 and self.in_use + n > self.budget:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._freed.wait(), remaining)
            except TimeoutError:
                return False
        self.in_use += n  # a lone request may exceed the budget: it must not wait forever
        return True

    def _release(self, n: int) -> None:
        """Give ``n`` bytes back and wake the waiting requests (synchronous: a cancelled
        request still gives back what it held)."""
        if n:
            self.in_use -= n
            self._freed.set()
            self._freed = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.routes:
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.body_timeout_s
        declared = _declared_length(scope)
        held = 0
        if declared and declared > self.small_bytes:
            if not await self._reserve(declared, deadline):
                await answer(send, 429, "the server is busy with other large requests; "
                              "retry later", [(b"retry-after", b"1")])
                return
            held = declared
        done = False
        streamed = 0

        async def receive_wrapper() -> Message:
            nonlocal done, held, streamed
            if done:  # after the body only a disconnect can come: no deadline for it
                return await receive()
            try:  # a timer on this task (asyncio.timeout), not a new task per message
                async with asyncio.timeout(deadline - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout_s:g} s"
                ) from None
            if message["type"] == "http.request":
                done = not message.get("more_body", False)
                streamed += len(message.get("body", b""))
                more = streamed - self.small_bytes - held  # chunked: beyond the free part
                if declared is None and more > 0:
                    if not await self._reserve(more, deadline):
                        raise TooManyRequests(
                            "the server is busy with other large requests; retry later")
                    held += more
            return message

        try:
            await self.app(scope, receive_wrapper, send)
        finally:
            self._release(held)
