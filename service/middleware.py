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

Errors found before the app runs are answered directly; errors found while the body streams are
raised from ``receive`` as BentoML exceptions, which BentoML's API wrapper answers with their
4xx status (the app only reads bodies inside that wrapper, on the API routes these guard).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from typing import Any
from urllib.parse import unquote_plus

import numpy as np
from bentoml.exceptions import BentoMLException

from service.errors import (
    InvalidArgument,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    UnsupportedMediaType,
    one_line,
)

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
                await _answer(send, 429, "the server is busy with other large requests; "
                              "retry later", [(b"retry-after", b"1")])
                return
            held = declared
        done = False
        streamed = 0

        async def receive_wrapper() -> Message:
            nonlocal done, held, streamed
            if done:  # after the body only a disconnect can come: no deadline for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
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


# --------------------------------------------------------------------------- form bodies

#: Content types the API routes read (an absent one is read as JSON, as BentoML does).
ACCEPTED_TYPES = ("application/json", "multipart/form-data", "application/x-www-form-urlencoded")
_FORM_CHARSETS = frozenset({"utf-8", "ascii", "latin-1"})  # codecs' canonical names


async def _answer(send: Send, status: int, message: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    start, body = _json_response(status, message)
    start["headers"] += headers or []
    await send(start)
    await send(body)


#: Every byte but the six that decide JSON nesting: brackets, braces, quote and backslash.
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"\\')))
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


class JSONDepth:
    """The deepest ``[``/``{`` nesting of JSON text fed in pieces (strings skipped).

    A piece without quotes or backslashes, outside a string, is summed with numpy over its
    brackets and braces alone (UTF-8 multi-byte sequences never contain them); others are read
    character by character.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.deepest = 0
        self._in_string = False
        self._escaped = False

    def feed(self, data: bytes | str) -> int:
        """Scan more text; returns the deepest nesting so far."""
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
        kept = b"" if self._in_string else raw.translate(None, _NOT_STRUCTURE)
        if not self._in_string and b'"' not in kept and b"\\" not in kept:
            if not kept:
                return self.deepest
            codes = np.frombuffer(kept, np.uint8)
            steps = np.isin(codes, _OPEN).astype(np.int64) - np.isin(codes, _CLOSE)
            walk = self.depth + np.cumsum(steps)
            # the level clamped at 0 at every step, as the loop below: walk - min(0, its minimum)
            levels = walk - np.minimum.accumulate(np.minimum(walk, 0))
            self.deepest = max(self.deepest, int(levels.max()))
            self.depth = int(levels[-1])
            return self.deepest
        # an escape applies to the next byte, which may be one the translation dropped: the loop
        # reads the whole text
        for ch in raw.decode("latin-1"):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "[{":
                self.depth += 1
                self.deepest = max(self.deepest, self.depth)
            elif ch in "]}":
                self.depth = max(0, self.depth - 1)
        return self.deepest


class _FormLimits:
    """What a form may hold (Starlette's own limits, so it never raises them first)."""

    def __init__(self, max_text_bytes: int, max_parts: int, max_depth: int,
                 max_header_bytes: int) -> None:
        self.max_text_bytes = max_text_bytes
        self.max_parts = max_parts
        self.max_depth = max_depth
        self.max_header_bytes = max_header_bytes


class _MultipartCheck:
    """Validates a multipart/form-data body chunk by chunk with python-multipart's parser."""

    def __init__(self, boundary: bytes, charset: str, file_fields: Collection[str],
                 limits: _FormLimits) -> None:
        from python_multipart.multipart import MultipartParser

        self.file_fields = file_fields
        self.limits = limits
        self.charset = charset
        self.files = 0
        self.fields = 0
        self._header = [b"", b""]
        self._header_bytes = 0
        self._disposition = b""
        self._name = ""
        self._text_bytes = 0
        self._depth: JSONDepth | None = None
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
        })

    def _begin(self) -> None:
        self._header = [b"", b""]
        self._header_bytes = 0
        self._disposition = b""
        self._depth = None

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            raise InvalidArgument(
                f"a multipart part's headers exceed {self.limits.max_header_bytes} bytes")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header[1] += data[start:end]

    def _header_end(self) -> None:
        if self._header[0].lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidArgument(
                'every multipart part needs a Content-Disposition header with a field name '
                '(form-data; name="...")')
        self._name = _safe_decode(options[b"name"], self.charset)
        is_file = b"filename" in options
        if is_file:
            self.files += 1
        else:
            self.fields += 1
        if max(self.files, self.fields) > self.limits.max_parts:
            raise InvalidArgument(f"a form may hold at most {self.limits.max_parts} files "
                                  f"and {self.limits.max_parts} fields")
        if self._name in self.file_fields and not is_file:
            raise InvalidArgument(f"{self._name!r} must be a file part (a Content-Disposition "
                                  "with a filename), not a text value")
        if self._name not in self.file_fields and is_file:
            raise InvalidArgument(f"{self._name!r} must be a text field, not a file part")
        self._text_bytes = 0
        self._depth = None if is_file else JSONDepth()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._depth is None:  # a file: its size is bounded by the request limit
            return
        self._text_bytes += end - start
        _check_text(self._name, self._text_bytes, self._depth.feed(data[start:end]),
                    self.limits)

    def feed(self, chunk: bytes) -> None:
        from python_multipart.exceptions import FormParserError

        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise InvalidArgument(f"malformed multipart body: {one_line(exc)}") from None

    def finish(self) -> None:
        from python_multipart.multipart import MultipartState

        if self.parser.state != MultipartState.END:
            raise InvalidArgument("the multipart body ends before its closing boundary")


class _UrlencodedCheck:
    """Validates an application/x-www-form-urlencoded body chunk by chunk."""

    def __init__(self, file_fields: Collection[str], limits: _FormLimits) -> None:
        from python_multipart.multipart import QuerystringParser

        self.file_fields = file_fields
        self.limits = limits
        self.fields = 0
        self._name = bytearray()
        self._value = bytearray()
        self.parser = QuerystringParser({
            "on_field_start": self._start,
            "on_field_name": self._field_name,
            "on_field_data": self._field_data,
            "on_field_end": self._end,
        })

    def _start(self) -> None:
        self._name, self._value = bytearray(), bytearray()

    def _grow(self, target: bytearray, data: bytes) -> None:
        if len(self._name) + len(self._value) + len(data) > self.limits.max_text_bytes:
            raise PayloadTooLarge(
                f"a form field exceeds {self.limits.max_text_bytes} bytes")
        target += data

    def _field_name(self, data: bytes, start: int, end: int) -> None:
        self._grow(self._name, data[start:end])

    def _field_data(self, data: bytes, start: int, end: int) -> None:
        self._grow(self._value, data[start:end])

    def _end(self) -> None:
        self.fields += 1
        if self.fields > self.limits.max_parts:
            raise InvalidArgument(f"a form may hold at most {self.limits.max_parts} fields")
        name = unquote_plus(self._name.decode("latin-1"))
        if name in self.file_fields:
            raise InvalidArgument(
                f"{name!r} must be a file: send it as multipart/form-data")
        value = unquote_plus(self._value.decode("latin-1"))
        _check_text(name, len(self._value), JSONDepth().feed(value), self.limits)

    def feed(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def finish(self) -> None:
        self.parser.finalize()


def _safe_decode(raw: bytes, charset: str) -> str:
    """Starlette's decoding of form names: the charset, else latin-1."""
    try:
        return raw.decode(charset)
    except (LookupError, UnicodeDecodeError):
        return raw.decode("latin-1")


def _check_text(name: str, size: int, depth: int, limits: _FormLimits) -> None:
    if size > limits.max_text_bytes:
        raise PayloadTooLarge(f"form field {name!r} exceeds {limits.max_text_bytes} bytes")
    if depth > limits.max_depth:
        raise InvalidArgument(
            f"form field {name!r} nests JSON deeper than {limits.max_depth} levels")


class FormGuardMiddleware:
    """Content type and form checks on the API routes, before BentoML parses the body.

    On each route in ``file_fields`` (path → the names of its file fields):

    - the content type must be JSON (or absent), multipart/form-data or urlencoded, else 415;
      a form's charset parameter must be UTF-8, ASCII or Latin-1, and the body must not be
      compressed (Content-Encoding), else 415;
    - multipart/form-data needs a boundary of 1 to 70 characters (RFC 2046), else 400;
    - a multipart body must be well framed up to its closing boundary; each part needs a
      Content-Disposition name; file fields must be file parts (BentoML would fetch a text
      value as a URL) and other fields text parts; at most ``max_parts`` files and fields
      (400);
    - a text field may hold at most ``max_text_bytes`` (413) and nest JSON at most
      ``max_depth`` deep (400);
    - an urlencoded body cannot carry a file field (400).

    JSON bodies pass unchanged: pydantic reports their errors as 400 already.

    Args:
        app: the wrapped ASGI app.
        file_fields: for each guarded path, the names of its file fields.
        max_text_bytes: per text field (Starlette's own limit: 1 MiB).
        max_parts: files, and fields, per form (Starlette's: 1000).
        max_depth: JSON nesting in a text field (images N×C×H×W need 4).
        max_header_bytes: the headers of one part.
    """

    def __init__(self, app: ASGIApp, file_fields: Mapping[str, Collection[str]] | None = None,
                 max_text_bytes: int = 2**20, max_parts: int = 1000, max_depth: int = 32,
                 max_header_bytes: int = 16 * 2**10) -> None:
        self.app = app
        self.file_fields = {path: frozenset(names) for path, names in (file_fields or {}).items()}
        self.limits = _FormLimits(max_text_bytes, max_parts, max_depth, max_header_bytes)

    def _checker(self, content_type: str, file_fields: Collection[str]
                 ) -> _MultipartCheck | _UrlencodedCheck | None:
        """The body checker for this content type (None for JSON).

        Raises:
            UnsupportedMediaType: a content type or charset the service does not read.
            InvalidArgument: multipart without a usable boundary.
        """
        from python_multipart.multipart import parse_options_header

        media, params = parse_options_header(content_type)
        media_type = media.decode("latin-1")
        if media_type in ("", "application/json"):
            return None
        if media_type not in ACCEPTED_TYPES:
            raise UnsupportedMediaType(f"content type {media_type!r} is not accepted; send "
                                       f"{', '.join(ACCEPTED_TYPES)}")
        charset = params.get(b"charset", b"utf-8").decode("latin-1")
        try:
            known = codecs.lookup(charset).name
        except LookupError:
            known = ""
        if known not in _FORM_CHARSETS:
            raise UnsupportedMediaType(f"form charset {charset!r} is not accepted; use utf-8")
        if media_type == "application/x-www-form-urlencoded":
            return _UrlencodedCheck(file_fields, self.limits)
        boundary = params.get(b"boundary", b"")
        if not 1 <= len(boundary) <= 70:
            raise InvalidArgument("multipart/form-data needs a boundary parameter of 1 to 70 "
                                  "characters in its Content-Type")
        return _MultipartCheck(boundary, known, file_fields, self.limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fields = self.file_fields.get(scope.get("path", "")) if scope["type"] == "http" else None
        if fields is None:
            await self.app(scope, receive, send)
            return
        content_type = encoding = ""
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-type":
                content_type = value.decode("latin-1")
            elif key.lower() == b"content-encoding":
                encoding = value.decode("latin-1").strip().lower()
        try:
            if encoding not in ("", "identity"):  # BentoML would parse the compressed bytes
                raise UnsupportedMediaType(f"content encoding {encoding!r} is not accepted; "
                                           "send the body uncompressed")
            checker = self._checker(content_type, fields)
        except BentoMLException as exc:
            await _answer(send, int(exc.error_code), str(exc))
            return
        if checker is None:
            await self.app(scope, receive, send)
            return
        finished = False

        async def receive_wrapper() -> Message:
            nonlocal finished
            message = await receive()
            if message["type"] == "http.request" and not finished:
                checker.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    finished = True
                    checker.finish()
            return message

        await self.app(scope, receive_wrapper, send)


# --------------------------------------------------------------------------- OpenAPI document

#: What the API routes answer besides the 200/400/404/500 BentoML documents by itself.
ERROR_STATUSES: dict[int, str] = {
    408: "Request Timeout: the body did not arrive in time",
    413: "Payload Too Large: the body, an upload, a text field or an image is over its limit",
    415: "Unsupported Media Type: the content type, charset or encoding, or the upload's format",
    422: "Unprocessable Entity: a well-formed value the model cannot take (shape, range, eps)",
    429: "Too Many Requests: the worker's budget for large bodies stayed full; retry later",
    503: "Service Unavailable: no model is served",
}
ERROR_SCHEMA = "LipcertError"


def document_errors(spec: dict[str, Any], routes: Collection[str]) -> dict[str, Any]:
    """Add :data:`ERROR_STATUSES` (one ``{"error": "<one line>"}`` schema) to the operations of
    ``routes`` in an OpenAPI document; statuses already documented are kept."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas[ERROR_SCHEMA] = {
        "type": "object", "title": ERROR_SCHEMA, "required": ["error"],
        "properties": {"error": {"type": "string", "description": "one line"}},
    }
    ref = {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}
    for route in routes:
        for operation in spec.get("paths", {}).get(route, {}).values():
            if not isinstance(operation, dict):
                continue
            responses = operation.setdefault("responses", {})
            for status, description in ERROR_STATUSES.items():
                responses.setdefault(str(status), {
                    "description": description, "content": {"application/json": {"schema": ref}},
                })
    return spec


class OpenAPIErrorsMiddleware:
    """Documents the API routes' other error statuses in the OpenAPI document (``/docs.json``).

    BentoML 1.4 lists only 200, 400, 404 and 500; this rewrites the document it serves with
    :func:`document_errors`, so clients and schemathesis see every status the routes answer.

    Args:
        app: the wrapped ASGI app.
        routes: the API routes.
        path: where BentoML serves the document.
    """

    def __init__(self, app: ASGIApp, routes: Collection[str] = (),
                 path: str = "/docs.json") -> None:
        self.app = app
        self.routes = tuple(routes)
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                held["start"] = message
                return
            if message["type"] != "http.response.body" or "start" not in held:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            start, body = held["start"], b"".join(chunks)
            if start["status"] == 200:
                body = json.dumps(document_errors(json.loads(body), self.routes)).encode()
            start["headers"] = [(k, v) for k, v in start.get("headers", [])
                                if k.lower() != b"content-length"]
            start["headers"].append((b"content-length", str(len(body)).encode()))
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, send_wrapper)
