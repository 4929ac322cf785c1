"""The content-type and form checks of the API routes, made while the body streams.

See :class:`FormGuardMiddleware`. Forms are checked with python-multipart's streaming parsers
(Starlette's own), keeping nothing but parser state; JSON bodies pass (pydantic answers their
errors), and so do the binary tensor bodies of the routes that read them (``service.tensors``).
"""

from __future__ import annotations

import codecs
from collections.abc import Collection, Mapping
from urllib.parse import unquote_plus

import numpy as np
from bentoml.exceptions import BentoMLException

from service.asgi import ASGIApp, Message, Receive, Scope, Send, answer
from service.errors import InvalidArgument, PayloadTooLarge, UnsupportedMediaType, one_line
from service.tensors import BINARY_TYPES

# --------------------------------------------------------------------------- form bodies

#: Content types the API routes read (an absent one is read as JSON, as BentoML does).
ACCEPTED_TYPES = ("application/json", "multipart/form-data", "application/x-www-form-urlencoded")
_FORM_CHARSETS = frozenset({"utf-8", "ascii", "latin-1"})  # codecs' canonical names


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

    JSON bodies pass unchanged: pydantic reports their errors as 400 already. So do the binary
    tensor bodies (``application/x-npy``, ``application/octet-stream``) on ``binary_routes``,
    whose reader checks them (``service.tensors``); elsewhere they are 415.

    Args:
        app: the wrapped ASGI app.
        file_fields: for each guarded path, the names of its file fields.
        binary_routes: the paths that read binary tensor bodies.
        max_text_bytes: per text field (Starlette's own limit: 1 MiB).
        max_parts: files, and fields, per form (Starlette's: 1000).
        max_depth: JSON nesting in a text field (images N×C×H×W need 4).
        max_header_bytes: the headers of one part.
    """

    def __init__(self, app: ASGIApp, file_fields: Mapping[str, Collection[str]] | None = None,
                 binary_routes: Collection[str] = (), max_text_bytes: int = 2**20,
                 max_parts: int = 1000, max_depth: int = 32,
                 max_header_bytes: int = 16 * 2**10) -> None:
        self.app = app
        self.binary_routes = frozenset(binary_routes)
        self.file_fields = {path: frozenset(names) for path, names in (file_fields or {}).items()}
        self.limits = _FormLimits(max_text_bytes, max_parts, max_depth, max_header_bytes)

    def _checker(self, content_type: str, file_fields: Collection[str], binary: bool = False
                 ) -> _MultipartCheck | _UrlencodedCheck | None:
        """The body checker for this content type (None for JSON, and for a binary tensor body
        where ``binary``).

        Raises:
            UnsupportedMediaType: a content type or charset the service does not read.
            InvalidArgument: multipart without a usable boundary.
        """
        from python_multipart.multipart import parse_options_header

        media, params = parse_options_header(content_type)
        media_type = media.decode("latin-1")
        if media_type in ("", "application/json") or (binary and media_type in BINARY_TYPES):
            return None
        if media_type not in ACCEPTED_TYPES:
            accepted = ACCEPTED_TYPES + (BINARY_TYPES if binary else ())
            raise UnsupportedMediaType(f"content type {media_type!r} is not accepted; send "
                                       f"{', '.join(accepted)}")
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
            checker = self._checker(content_type, fields, scope["path"] in self.binary_routes)
        except BentoMLException as exc:
            await answer(send, int(exc.error_code), str(exc))
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
