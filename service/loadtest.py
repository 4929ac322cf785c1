"""A bounded load generator against a running lipcert service: ``python -m service.loadtest URL``.

At each concurrency level worker threads, each with its own keep-alive HTTP connection, POST the
same request until ``requests`` have been sent or ``seconds`` have passed, whichever comes first.
Reported per level: throughput (requests/s and images/s), latency p50/p95/p99 of successful
requests, errors (non-200 answers, malformed answers, connection failures), and the median
``inference_ms`` the service itself reports. The command line measures ``/predict`` (one PNG
upload) at one client and ``/predict_tensor`` (one image per request, as a ``.npy`` body where the
service offers it, else JSON) sequentially and at ``--clients`` concurrent clients, which the
server's adaptive batching merges; ``python -m bench service`` adds 64-image requests, the
in-process ONNX Runtime comparison and the ratios, and writes result files.

Only loopback URLs are accepted: this tool generates load, and must never aim it elsewhere.
"""

from __future__ import annotations

import argparse
import http.client
import io
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadRequest:
    """One request, sent again and again.

    Attributes:
        path: the route (``/predict_tensor``, ``/predict``).
        body: the request bytes.
        content_type: its ``Content-Type``.
        images: images per request; a list of that many predictions is expected back, or one
            prediction object when None (``/predict``).
    """

    path: str
    body: bytes
    content_type: str = "application/json"
    images: int | None = 1


def check_loopback(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http://`` URL on loopback; ValueError for anything else.

    Allowed hosts: ``localhost``, 127.0.0.0/8 and ``::1``.
    """
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"URL scheme must be http, got {parts.scheme!r} in {url!r}")
    host = parts.hostname or ""
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        raise ValueError(
            f"refusing non-loopback URL {url!r}; allowed hosts: localhost, 127.0.0.0/8, ::1"
        )
    return host, parts.port or 80


def _post(
    conn: http.client.HTTPConnection,
    path: str,
    body: bytes,
    content_type: str = "application/json",
) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": content_type})
    resp = conn.getresponse()
    return resp.status, resp.read()


class KeepAliveClient:
    """One keep-alive HTTP/1.1 connection that sends a prebuilt request again and again.

    The load generator shares the machine with the server, so its own cost per request is kept
    to a send and a read: the request bytes are built once (:func:`raw_request`) and the answer
    is read with a buffered reader (status line, headers, a ``Content-Length`` or chunked body),
    where ``http.client`` would build the request and parse the headers with ``email`` each time.
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.address = (host, port)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.reader: Any = None

    def close(self) -> None:
        if self.sock is not None:
            self.reader.close()
            self.sock.close()
        self.sock = self.reader = None

    def send(self, raw: bytes) -> tuple[int, bytes]:
        """``(status, body)`` of one request; OSError or ValueError when the exchange fails
        (the connection is then closed, and the next call opens another)."""
        try:
            if self.sock is None:
                self.sock = socket.create_connection(self.address, timeout=self.timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.reader = self.sock.makefile("rb")
            self.sock.sendall(raw)
            return self._answer()
        except (OSError, ValueError):
            self.close()
            raise

    def _answer(self) -> tuple[int, bytes]:
        status_line = self.reader.readline(_MAX_LINE)
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        version, status_text = status_line.split(None, 2)[:2]
        status = int(status_text)
        # HTTP/1.0 closes after each answer unless it says keep-alive
        length, chunked, close = None, False, version == b"HTTP/1.0"
        while (line := self.reader.readline(_MAX_LINE)) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower() or (close and b"keep-alive" not in value.lower())
        if chunked:
            body = b"".join(iter(self._chunk, b""))
        elif length is not None:
            body = self.reader.read(length)
            if len(body) != length:
                raise ConnectionResetError("the answer ended early")
        else:
            body, close = self.reader.read(), True
        if close:
            self.close()
        return status, body

    def _chunk(self) -> bytes:
        size = int(self.reader.readline(_MAX_LINE).split(b";")[0], 16)
        if size == 0:  # the last chunk: trailers, up to the blank line
            while self.reader.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                pass
            return b""
        data = self.reader.read(size + 2)  # the chunk and its CRLF
        if len(data) != size + 2:
            raise ConnectionResetError("the answer ended inside a chunk")
        return data[:size]


_MAX_LINE = 65536


def raw_request(host: str, port: int, request: LoadRequest) -> bytes:
    """The bytes of ``request`` as an HTTP/1.1 POST (keep-alive)."""
    head = (f"POST {request.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: {request.content_type}\r\nContent-Length: {len(request.body)}\r\n"
            "\r\n")
    return head.encode("latin-1") + request.body


def list_models(url: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """The service's ``POST /models`` answer, or None when it has no such route."""
    host, port = check_loopback(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        status, data = _post(conn, "/models", b"{}")
    finally:
        conn.close()
    if status != 200:
        log.warning("POST /models answered %s; pass --model and --input", status)
        return None
    return json.loads(data)


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, Any]:
    """``{"p50_ms": …}`` for each percentile in ``qs`` of ``values`` (ms; None each when empty)."""
    if len(values) == 0:
        return {f"p{q}_ms": None for q in qs}
    p = np.percentile(np.asarray(values, dtype=np.float64), list(qs))
    return {f"p{q}_ms": float(v) for q, v in zip(qs, p, strict=True)}


def _parse_answer(data: bytes, request: LoadRequest) -> dict[str, Any] | None:
    """The first prediction of a well-formed answer, else None."""
    try:
        answer = json.loads(data)
    except ValueError:
        return None
    if request.images is None:
        return answer if isinstance(answer, dict) else None
    if isinstance(answer, list) and len(answer) == request.images:
        return answer[0] if answer and isinstance(answer[0], dict) else {}
    return None


_INFERENCE_MS = re.compile(rb'"inference_ms":\s*([0-9.eE+-]+)')


def _check_answer(data: bytes, request: LoadRequest) -> dict[str, Any] | None:
    """:func:`_parse_answer`'s verdict at a fraction of its cost, for every answer after a
    connection's first (which is parsed in full): a JSON list of the expected number of
    predictions (each with a ``label``), and the first ``inference_ms``.

    On a machine shared with the server the load generator's own CPU time is taken from the
    server; a full parse of a 64-prediction answer costs more than the server's ONNX run.
    """
    if request.images is None:
        return _parse_answer(data, request)
    body = data.strip()
    if not (body.startswith(b"[") and body.endswith(b"]")):
        return None
    if body.count(b'"label":') != request.images:
        return None
    match = _INFERENCE_MS.search(body)
    try:
        return {"inference_ms": float(match.group(1))} if match else {}
    except ValueError:
        return None


def run_level(
    url: str,
    request: LoadRequest,
    concurrency: int,
    *,
    requests: int,
    seconds: float,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """One concurrency level, bounded by ``requests`` and ``seconds``.

    Returns:
        ``concurrency, requests, ok, errors, error_kinds, seconds, requests_per_s,
        images_per_s``, the latency percentiles (ms) and ``server_inference_p50_ms``.
    """
    host, port = check_loopback(url)
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    server_ms: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    deadline = start + seconds

    def ticket() -> bool:
        nonlocal issued
        with lock:
            if issued >= requests or time.perf_counter() >= deadline:
                return False
            issued += 1
            return True

    def error(kind: str) -> None:
        with lock:
            errors[kind] = errors.get(kind, 0) + 1

    raw = raw_request(host, port, request)

    def worker() -> None:
        conn = KeepAliveClient(host, port, timeout)
        check = _parse_answer  # the first answer in full, then the light check
        try:
            while ticket():
                t0 = time.perf_counter()
                try:
                    status, data = conn.send(raw)
                except (OSError, ValueError) as err:  # closed: reconnects on the next request
                    error(type(err).__name__)
                    continue
                dt = time.perf_counter() - t0
                if status != 200:
                    error(f"HTTP {status}")
                    continue
                first = check(data, request)
                if first is None:
                    error("malformed answer")
                    continue
                check = _check_answer
                with lock:
                    latencies.append(1e3 * dt)
                    ms = first.get("inference_ms")
                    if isinstance(ms, (int, float)):
                        server_ms.append(float(ms))
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = len(latencies)
    return dict(
        concurrency=concurrency, requests=issued, ok=ok, errors=sum(errors.values()),
        error_kinds=errors, seconds=wall, requests_per_s=ok / wall if wall else 0.0,
        images_per_s=ok * (request.images or 1) / wall if wall else 0.0,
        **percentiles(latencies),
        server_inference_p50_ms=float(np.median(server_ms)) if server_ms else None,
    )


#: The request forms of ``/predict_tensor`` (see ``service.tensors``).
FORMATS = ("json", "npy")


def tensor_request(images: np.ndarray, model: str | None, form: str = "json") -> LoadRequest:
    """A ``/predict_tensor`` request of ``images`` ``(N, C, H, W)`` in [0, 1].

    Args:
        images: the batch.
        model: its model (the body's ``model`` for JSON, ``?model=`` for ``.npy``), or None.
        form: ``json`` (nested lists, 4 decimals) or ``npy`` (float32, ``np.save``).
    """
    if form == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images, dtype=np.float32))
        path = "/predict_tensor" + ("" if model is None else f"?model={quote(model, safe='')}")
        return LoadRequest(path, buf.getvalue(), "application/x-npy", images=len(images))
    if form != "json":
        raise ValueError(f"unknown request form {form!r}; choose from {', '.join(FORMATS)}")
    payload: dict[str, Any] = {"images": images.round(4).tolist()}
    if model is not None:
        payload["model"] = model
    return LoadRequest("/predict_tensor", json.dumps(payload).encode(), images=len(images))


def binary_supported(url: str, timeout: float = 10.0) -> bool:
    """Whether the service's OpenAPI document lists ``.npy`` bodies for ``/predict_tensor``."""
    host, port = check_loopback(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/docs.json")
        resp = conn.getresponse()
        spec = json.loads(resp.read()) if resp.status == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        conn.close()
    body = spec.get("paths", {}).get("/predict_tensor", {}).get("post", {}).get("requestBody", {})
    return "application/x-npy" in body.get("content", {})


def png_request(image: np.ndarray, model: str | None) -> LoadRequest:
    """A ``/predict`` multipart upload of one image ``(C, H, W)`` in [0, 1] as a PNG."""
    from PIL import Image

    pixels = (np.moveaxis(image, 0, -1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buf, "PNG")
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode() + buf.getvalue() + b"\r\n"
    ]
    if model is not None:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            .encode()
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return LoadRequest("/predict", body, f"multipart/form-data; boundary={boundary}", None)


def resolve_model(
    url: str, model: str | None, input_shape: tuple[int, ...] | None, timeout: float = 10.0
) -> tuple[str | None, tuple[int, ...]]:
    """The model to load (default: the service's default, else the first listed) and its input
    shape (default: from ``POST /models``).

    Raises:
        ValueError: an unknown model, or no way to know the input shape.
    """
    listing = list_models(url, timeout) or {}
    models = listing.get("models", [])
    names = [m.get("name") for m in models]
    model = model or listing.get("default_model") or (names[0] if names else None)
    if names and model not in names:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(map(str, names))}")
    info = models[names.index(model)] if model in names else {}
    shape = input_shape or (tuple(info["input_shape"]) if info.get("input_shape") else None)
    if shape is None:
        raise ValueError("the input shape is unknown: pass --input CxHxW")
    return model, tuple(shape)


def run(url: str, requests: int, clients: int, seconds: float, model: str | None,
        form: str = "auto") -> dict:
    """The command line's measurements (latencies in ms, throughput in images per second).

    ``form`` is the ``/predict_tensor`` request form: ``json``, ``npy``, or ``auto`` (``npy``
    where the service's OpenAPI document lists it, else ``json``).
    """
    model, shape = resolve_model(url, model, None)
    if form == "auto":
        form = "npy" if binary_supported(url) else "json"
    image = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    bounds = dict(requests=requests, seconds=seconds)
    tensor = tensor_request(image, model, form)
    for warm in (png_request(image[0], model), tensor):
        run_level(url, warm, 1, requests=5, seconds=seconds)
    return dict(
        model=model,
        input_shape=list(shape),
        form=form,
        predict_batch1=run_level(url, png_request(image[0], model), 1, **bounds),
        predict_tensor=[run_level(url, tensor, c, **bounds) for c in sorted({1, clients})],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:3000")
    parser.add_argument("--requests", type=int, default=400, help="requests per phase")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0, help="time cap per phase")
    parser.add_argument("--model", default=None, help="model name (default: the default model)")
    parser.add_argument("--form", default="auto", choices=("auto", *FORMATS),
                        help="/predict_tensor request form (default: npy where offered)")
    args = parser.parse_args(argv)
    result = run(args.url, args.requests, args.clients, args.seconds, args.model, args.form)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
