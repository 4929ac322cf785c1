"""The OpenAPI document BentoML serves (``/docs.json``), completed: every error status the API
routes answer, and the binary bodies ``/predict_tensor`` reads."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from service.asgi import ASGIApp, Message, Receive, Scope, Send
from service.tensors import DTYPES, NPY_TYPE, RAW_TYPE

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


#: The query parameters of a binary tensor body (``model`` is read with JSON bodies too).
BINARY_PARAMETERS: list[dict[str, Any]] = [
    {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "model name or method (binary bodies; a JSON body may name it instead)"},
    {"name": "dtype", "in": "query", "required": False,
     "schema": {"type": "string", "enum": list(DTYPES)},
     "description": f"{RAW_TYPE} only: the values' type (default float32, little-endian)"},
]
BINARY_BODIES: dict[str, dict[str, Any]] = {
    NPY_TYPE: {"schema": {"type": "string", "format": "binary",
                          "description": "a .npy file (np.save) of N×C×H×W float32 in [0, 1] "
                                         "or uint8 in 0..255"}},
    RAW_TYPE: {"schema": {"type": "string", "format": "binary",
                          "description": "C-ordered N×C×H×W values (dtype: float32 or uint8); "
                                         "N = bytes ÷ the model's C×H×W values"}},
}


def document_binary(spec: dict[str, Any], routes: Collection[str]) -> dict[str, Any]:
    """Add the binary tensor bodies and their query parameters to the POST of ``routes``."""
    for route in routes:
        operation = spec.get("paths", {}).get(route, {}).get("post")
        if not isinstance(operation, dict):
            continue
        content = operation.setdefault("requestBody", {}).setdefault("content", {})
        for media, body in BINARY_BODIES.items():
            content.setdefault(media, body)
        names = {p.get("name") for p in operation.get("parameters", [])}
        operation.setdefault("parameters", []).extend(
            p for p in BINARY_PARAMETERS if p["name"] not in names)
    return spec


class OpenAPIErrorsMiddleware:
    """Documents the API routes' other error statuses in the OpenAPI document (``/docs.json``).

    BentoML 1.4 lists only 200, 400, 404 and 500; this rewrites the document it serves with
    :func:`document_errors`, so clients and schemathesis see every status the routes answer,
    and with :func:`document_binary` for the routes that read binary tensor bodies.

    Args:
        app: the wrapped ASGI app.
        routes: the API routes.
        binary_routes: those that read binary tensor bodies.
        path: where BentoML serves the document.
    """

    def __init__(self, app: ASGIApp, routes: Collection[str] = (),
                 binary_routes: Collection[str] = (), path: str = "/docs.json") -> None:
        self.app = app
        self.routes = tuple(routes)
        self.binary_routes = tuple(binary_routes)
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
                spec = document_errors(json.loads(body), self.routes)
                body = json.dumps(document_binary(spec, self.binary_routes)).encode()
            start["headers"] = [(k, v) for k, v in start.get("headers", [])
                                if k.lower() != b"content-length"]
            start["headers"].append((b"content-length", str(len(body)).encode()))
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, send_wrapper)
