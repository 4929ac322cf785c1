"""ASGI types, and the one error answer the service's middleware sends:
``{"error": "<one line>"}``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.errors import one_line

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def json_response(status: int, message: str) -> tuple[Message, Message]:
    """The start and body messages of an error answer (``message`` made one line)."""
    body = json.dumps({"error": one_line(message)}, ensure_ascii=False).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


async def answer(send: Send, status: int, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send an error answer, with extra ``headers``."""
    start, body = json_response(status, message)
    start["headers"] += headers or []
    await send(start)
    await send(body)
