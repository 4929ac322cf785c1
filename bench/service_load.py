"""``python -m bench service``: a bounded load generator against a running lipcert service.

At each concurrency level (default 1, 8, 32, 64) worker threads, each with its own keep-alive
HTTP connection, POST the same ``/predict_tensor`` request (``{"images": N×C×H×W, "model": …}``)
until ``requests`` have been sent or ``seconds`` have passed, whichever comes first. Reported per
level: throughput (requests/s and images/s), latency p50/p95/p99 of successful requests, errors
(non-200 answers, malformed answers, connection failures), and the median ``inference_ms`` the
service itself reports. The same batch then runs through ONNX Runtime in this process
(``--onnx PATH``) to show the HTTP overhead as a ratio.

Only loopback URLs are accepted: this tool generates load, and must never aim it elsewhere.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bench.tables import markdown_table, write_csv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceLoadConfig:
    """What ``bench service`` sends.

    Args:
        url: ``http://127.0.0.1:PORT`` (loopback only).
        model: model name (default: the service's default model, else the first listed).
        requests: at most this many requests per concurrency level.
        seconds: at most this long per concurrency level.
        concurrency: the levels (number of concurrent clients).
        batch: images per request.
        input_shape: ``(C, H, W)``; default: the model's ``input_shape`` from ``POST /models``.
        onnx: the model's ONNX file for the in-process ONNX Runtime comparison (optional).
        timeout: per-request timeout, seconds.
        out: output folder.
    """

    url: str
    model: str | None = None
    requests: int = 200
    seconds: float = 10.0
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    batch: int = 1
    input_shape: tuple[int, int, int] | None = None
    onnx: Path | None = None
    timeout: float = 30.0
    out: Path = field(default=Path("bench_results/service"))

    def validate(self) -> None:
        """Raises ValueError naming the bad value (and the allowed ones)."""
        check_loopback(self.url)
        if self.requests < 1 or self.seconds <= 0:
            raise ValueError(f"requests and seconds must be positive, got {self.requests}, "
                             f"{self.seconds}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.onnx is not None and not Path(self.onnx).is_file():
            raise ValueError(f"--onnx {self.onnx} is not a file")


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


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


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


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 of ``values`` (None each when empty)."""
    if not values:
        return dict(p50_ms=None, p95_ms=None, p99_ms=None)
    p = np.percentile(np.asarray(values), [50, 95, 99])
    return dict(p50_ms=float(p[0]), p95_ms=float(p[1]), p99_ms=float(p[2]))


def run_level(cfg: ServiceLoadConfig, body: bytes, concurrency: int) -> dict[str, Any]:
    """One concurrency level: bounded by ``cfg.requests`` and ``cfg.seconds``."""
    host, port = check_loopback(cfg.url)
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    server_ms: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    deadline = start + cfg.seconds

    def ticket() -> bool:
        nonlocal issued
        with lock:
            if issued >= cfg.requests or time.perf_counter() >= deadline:
                return False
            issued += 1
            return True

    def error(kind: str) -> None:
        with lock:
            errors[kind] = errors.get(kind, 0) + 1

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=cfg.timeout)
        try:
            while ticket():
                t0 = time.perf_counter()
                try:
                    status, data = _post(conn, "/predict_tensor", body)
                except (OSError, http.client.HTTPException) as err:
                    error(type(err).__name__)
                    conn.close()  # reconnect on the next request
                    conn = http.client.HTTPConnection(host, port, timeout=cfg.timeout)
                    continue
                dt = time.perf_counter() - t0
                if status != 200:
                    error(f"HTTP {status}")
                    continue
                try:
                    preds = json.loads(data)
                    ok = isinstance(preds, list) and len(preds) == cfg.batch
                except ValueError:
                    ok = False
                if not ok:
                    error("malformed answer")
                    continue
                with lock:
                    latencies.append(1e3 * dt)
                    ms = preds[0].get("inference_ms") if isinstance(preds[0], dict) else None
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
        images_per_s=ok * cfg.batch / wall if wall else 0.0, **percentiles(latencies),
        server_inference_p50_ms=float(np.median(server_ms)) if server_ms else None,
    )


def run_ort(cfg: ServiceLoadConfig, images: np.ndarray) -> dict[str, Any]:
    """The same batch through ONNX Runtime in-process, sequentially, under the same bounds."""
    from bench.onnx_io import ort_session

    session = ort_session(cfg.onnx)
    name = session.get_inputs()[0].name
    for _ in range(3):  # warm-up: graph optimization, allocator
        session.run(None, {name: images})
    times: list[float] = []
    deadline = time.perf_counter() + cfg.seconds
    while len(times) < cfg.requests and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        session.run(None, {name: images})
        times.append(1e3 * (time.perf_counter() - t0))
    total = sum(times) / 1e3
    return dict(runs=len(times), requests_per_s=len(times) / total, **percentiles(times))


def run_service_load(cfg: ServiceLoadConfig) -> dict[str, Any]:
    """Run every level (and ONNX Runtime when ``cfg.onnx``); write service.json/.csv/.md.

    Returns:
        The result document.

    Raises:
        ValueError: a non-loopback URL, bad bounds, or no way to know the model or input shape.
    """
    from bench.machine import describe_machine

    cfg.validate()
    listing = list_models(cfg.url, cfg.timeout)
    models = (listing or {}).get("models", [])
    names = [m.get("name") for m in models]
    info: dict[str, Any] = {}
    model = cfg.model or (listing or {}).get("default_model") or (names[0] if names else None)
    if names and model not in names:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(map(str, names))}")
    if model in names:
        info = models[names.index(model)]
    shape = cfg.input_shape or (tuple(info["input_shape"]) if info.get("input_shape") else None)
    if shape is None:
        raise ValueError("the input shape is unknown: pass --input CxHxW")
    rng = np.random.default_rng(0)
    images = rng.random((cfg.batch, *shape), dtype=np.float32)
    payload: dict[str, Any] = {"images": images.round(4).tolist()}
    if model is not None:
        payload["model"] = model
    body = json.dumps(payload).encode()

    levels = []
    for c in cfg.concurrency:
        log.info("bench service: concurrency %d", c)
        levels.append(run_level(cfg, body, c))
    ort = run_ort(cfg, images) if cfg.onnx is not None else None
    if ort is not None:
        for lev in levels:
            if lev["p50_ms"] is not None and ort["p50_ms"]:
                lev["http_over_ort_p50"] = lev["p50_ms"] / ort["p50_ms"]
            if ort["requests_per_s"]:
                lev["http_over_ort_throughput"] = lev["requests_per_s"] / ort["requests_per_s"]
    cfg.out.mkdir(parents=True, exist_ok=True)
    doc = dict(
        benchmark="service",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        machine=describe_machine("cpu"),
        model=model, input_shape=list(shape), request_bytes=len(body), levels=levels, ort=ort,
    )
    (cfg.out / "service.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    write_csv(levels, cfg.out / "service.csv")
    (cfg.out / "service.md").write_text(service_markdown(doc), encoding="utf-8")
    return doc


def service_markdown(doc: dict[str, Any]) -> str:
    """The service result as markdown."""
    cfg = doc["config"]
    lines = [
        f"Model `{doc['model']}`, input {doc['input_shape']}, {cfg['batch']} image(s) per request "
        f"({doc['request_bytes']:,} bytes), ≤ {cfg['requests']} requests or ≤ {cfg['seconds']} s "
        "per level.\n\n",
        markdown_table(
            doc["levels"],
            ["concurrency", "ok", "errors", "requests_per_s", "images_per_s", "p50_ms", "p95_ms",
             "p99_ms", "server_inference_p50_ms", "http_over_ort_p50",
             "http_over_ort_throughput"],
            ["clients", "ok", "errors", "req/s", "img/s", "p50 ms", "p95 ms", "p99 ms",
             "server ORT p50 ms", "p50 ÷ raw ORT", "req/s ÷ raw ORT"],
        ),
    ]
    if doc["ort"]:
        o = doc["ort"]
        lines.append(f"\nRaw ONNX Runtime in-process (sequential): {o['requests_per_s']:.1f} "
                     f"runs/s, p50 {o['p50_ms']:.3f} ms, p99 {o['p99_ms']:.3f} ms.\n")
    return "".join(lines)
