"""``python -m bench service``: :mod:`service.loadtest`'s load generator at several concurrency
levels (default 1, 8, 32, 64), each POSTing the same ``/predict_tensor`` request
(``{"images": N×C×H×W, "model": …}``), plus the same batch through ONNX Runtime in this process
(``--onnx PATH``) to show the HTTP overhead as a ratio; writes ``service.json``, ``.csv`` and
``.md``. Loopback URLs only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.tables import markdown_table, result_doc, write_result
from service.loadtest import check_loopback, percentiles, resolve_model, run_level, tensor_request

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
    model, shape = resolve_model(cfg.url, cfg.model, cfg.input_shape, cfg.timeout)
    images = np.random.default_rng(0).random((cfg.batch, *shape), dtype=np.float32)
    request = tensor_request(images, model)

    levels = []
    for c in cfg.concurrency:
        log.info("bench service: concurrency %d", c)
        levels.append(
            run_level(cfg.url, request, c, requests=cfg.requests, seconds=cfg.seconds,
                      timeout=cfg.timeout)
        )
    ort = run_ort(cfg, images) if cfg.onnx is not None else None
    if ort is not None:
        for lev in levels:
            if lev["p50_ms"] is not None and ort["p50_ms"]:
                lev["http_over_ort_p50"] = lev["p50_ms"] / ort["p50_ms"]
            if ort["requests_per_s"]:
                lev["http_over_ort_throughput"] = lev["requests_per_s"] / ort["requests_per_s"]
    cfg.out.mkdir(parents=True, exist_ok=True)
    doc = result_doc(
        "service", cfg, describe_machine("cpu"), model=model, input_shape=list(shape),
        request_bytes=len(request.body), levels=levels, ort=ort,
    )
    write_result(cfg.out, "service", doc, levels, service_markdown(doc))
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
