"""``python -m bench service``: the service under load, and the ratios of issue 17 side by side.

One run against a running lipcert service (loopback only), with :mod:`service.loadtest`'s load
generator, each phase bounded by ``requests`` and ``seconds``:

1. ``/predict_tensor`` with ``batch`` image(s) per request at each concurrency level (default
   1, 8, 32, 64), as ``.npy`` bodies where the service's OpenAPI document offers them (else
   JSON); then, when that was ``.npy``, JSON at 1 and the scaling level (32) for comparison;
2. 64-image requests (``big_batch``) at ``big_concurrency`` clients (default 1, 2, 4);
3. with ``--onnx PATH``, the same batches through ONNX Runtime in this process, sequentially,
   with one intra-op thread and with one per core; the faster is "raw ORT".

The ratios: images/s at 32 clients ÷ at one client (target ≥ 3), p99 at 32 clients (≤ 100 ms),
the best 64-image images/s ÷ raw ORT's at batch 64 (≥ 0.8). Writes ``service.json``, ``.csv``
and ``.md``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.tables import markdown_table, result_doc, write_result
from service.loadtest import (
    binary_supported,
    check_loopback,
    percentiles,
    resolve_model,
    run_level,
    tensor_request,
)

log = logging.getLogger(__name__)

#: Targets of issue 17 (one model, one image per request, loopback, the 2-core machine).
TARGET_SCALING = 3.0
TARGET_P99_MS = 100.0
TARGET_BIG_VS_ORT = 0.8


@dataclass(frozen=True)
class ServiceLoadConfig:
    """What ``bench service`` sends.

    Args:
        url: ``http://127.0.0.1:PORT`` (loopback only).
        model: model name (default: the service's default model, else the first listed).
        requests: at most this many requests per phase.
        seconds: at most this long per phase.
        concurrency: the levels (number of concurrent clients) of ``batch``-image requests.
        batch: images per request.
        input_shape: ``(C, H, W)``; default: the model's ``input_shape`` from ``POST /models``.
        onnx: the model's ONNX file for the in-process ONNX Runtime comparison (optional).
        timeout: per-request timeout, seconds.
        out: output folder.
        form: ``auto`` (``npy`` where the service offers it), ``json`` or ``npy``.
        scaling_clients: the level whose throughput is compared with one client's.
        big_batch: images per request of the large-request phase (0 skips it).
        big_concurrency: its levels.
        warmup: requests sent (at 4 clients) before each request kind is measured.
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
    form: str = "auto"
    scaling_clients: int = 32
    big_batch: int = 64
    big_concurrency: tuple[int, ...] = (1, 2, 4)
    warmup: int = 100

    def validate(self) -> None:
        """Raises ValueError naming the bad value (and the allowed ones)."""
        check_loopback(self.url)
        if self.requests < 1 or self.seconds <= 0:
            raise ValueError(f"requests and seconds must be positive, got {self.requests}, "
                             f"{self.seconds}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.batch < 1 or self.big_batch < 0:
            raise ValueError(f"batch must be >= 1 and big_batch >= 0, got {self.batch}, "
                             f"{self.big_batch}")
        if self.big_concurrency and min(self.big_concurrency) < 1:
            raise ValueError(f"big_concurrency levels must be >= 1, got {self.big_concurrency}")
        if self.form not in ("auto", "json", "npy"):
            raise ValueError(f"unknown form {self.form!r}; choose from auto, json, npy")
        if self.onnx is not None and not Path(self.onnx).is_file():
            raise ValueError(f"--onnx {self.onnx} is not a file")


def run_ort(cfg: ServiceLoadConfig, images: np.ndarray, threads: int | None = None
            ) -> dict[str, Any]:
    """The same batch through ONNX Runtime in-process, sequentially, under the same bounds."""
    from bench.onnx_io import ort_session

    session = ort_session(cfg.onnx, threads=threads)
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
    return dict(runs=len(times), batch=len(images), threads=threads,
                requests_per_s=len(times) / total, images_per_s=len(times) * len(images) / total,
                **percentiles(times))


def best_ort(cfg: ServiceLoadConfig, images: np.ndarray) -> dict[str, Any]:
    """:func:`run_ort` with one thread and with one per core; the faster, with both figures."""
    runs = [run_ort(cfg, images, t) for t in sorted({1, os.cpu_count() or 1})]
    best = max(runs, key=lambda r: r["images_per_s"])
    return {**best, "by_threads": {str(r["threads"]): r["images_per_s"] for r in runs}}


def _phase(cfg: ServiceLoadConfig, request: Any, levels: tuple[int, ...], label: str
           ) -> list[dict[str, Any]]:
    """Warm up, then every level of one request kind; each level labelled with ``label``."""
    if cfg.warmup:  # the batcher's first requests train its latency model, one at a time
        run_level(cfg.url, request, 4, requests=min(cfg.warmup, cfg.requests),
                  seconds=cfg.seconds, timeout=cfg.timeout)
    out = []
    for c in levels:
        log.info("bench service: %s, %d image(s) per request, concurrency %d", label,
                 request.images, c)
        level = run_level(cfg.url, request, c, requests=cfg.requests, seconds=cfg.seconds,
                          timeout=cfg.timeout)
        out.append({"form": label, "images_per_request": request.images, **level})
    return out


def _level(levels: list[dict[str, Any]], clients: int) -> dict[str, Any] | None:
    return next((lev for lev in levels if lev["concurrency"] == clients), None)


def ratios(cfg: ServiceLoadConfig, levels: list[dict[str, Any]],
           big: list[dict[str, Any]], ort_big: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's ratios (None where a phase was not run), each with its target."""
    rows = []
    forms = dict.fromkeys(lev["form"] for lev in levels)
    for form in forms:
        mine = [lev for lev in levels if lev["form"] == form]
        one, many = _level(mine, 1), _level(mine, cfg.scaling_clients)
        scaling = (many["images_per_s"] / one["images_per_s"]
                   if one and many and one["images_per_s"] else None)
        rows.append(dict(ratio=f"{cfg.scaling_clients} clients ÷ 1 client, img/s ({form})",
                         value=scaling, target=f"≥ {TARGET_SCALING:g}",
                         met=None if scaling is None else scaling >= TARGET_SCALING))
        p99 = many["p99_ms"] if many else None
        rows.append(dict(ratio=f"p99 at {cfg.scaling_clients} clients, ms ({form})", value=p99,
                         target=f"≤ {TARGET_P99_MS:g}",
                         met=None if p99 is None else p99 <= TARGET_P99_MS))
    if big:
        top = max(big, key=lambda lev: lev["images_per_s"])
        share = (top["images_per_s"] / ort_big["images_per_s"]
                 if ort_big and ort_big["images_per_s"] else None)
        rows.append(dict(
            ratio=f"{cfg.big_batch}-image requests ({top['concurrency']} clients, {top['form']}) "
                  f"÷ raw ORT batch {cfg.big_batch}, img/s",
            value=share, target=f"≥ {TARGET_BIG_VS_ORT:g}",
            met=None if share is None else share >= TARGET_BIG_VS_ORT))
    return rows


def run_service_load(cfg: ServiceLoadConfig) -> dict[str, Any]:
    """Run every phase (and ONNX Runtime when ``cfg.onnx``); write service.json/.csv/.md.

    Returns:
        The result document.

    Raises:
        ValueError: a non-loopback URL, bad bounds, or no way to know the model or input shape.
    """
    from bench.machine import describe_machine

    cfg.validate()
    model, shape = resolve_model(cfg.url, cfg.model, cfg.input_shape, cfg.timeout)
    form = cfg.form if cfg.form != "auto" else ("npy" if binary_supported(cfg.url) else "json")
    rng = np.random.default_rng(0)
    images = rng.random((cfg.batch, *shape), dtype=np.float32)
    request = tensor_request(images, model, form)
    levels = _phase(cfg, request, cfg.concurrency, form)
    if form != "json":  # the nested-list form beside it, at one client and the scaling level
        json_levels = tuple(c for c in (1, cfg.scaling_clients) if c in cfg.concurrency)
        levels += _phase(cfg, tensor_request(images, model, "json"), json_levels, "json")
    big_images = rng.random((cfg.big_batch, *shape), dtype=np.float32)
    big = (_phase(cfg, tensor_request(big_images, model, form), cfg.big_concurrency, form)
           if cfg.big_batch else [])
    ort = run_ort(cfg, images) if cfg.onnx is not None else None
    ort_big = best_ort(cfg, big_images) if cfg.onnx is not None and cfg.big_batch else None
    for lev in levels:
        if ort is not None and lev["p50_ms"] is not None and ort["p50_ms"]:
            lev["http_over_ort_p50"] = lev["p50_ms"] / ort["p50_ms"]
        if ort is not None and ort["requests_per_s"]:
            lev["http_over_ort_throughput"] = lev["requests_per_s"] / ort["requests_per_s"]
    for lev in big:
        if ort_big is not None and ort_big["images_per_s"]:
            lev["images_over_ort"] = lev["images_per_s"] / ort_big["images_per_s"]
    cfg.out.mkdir(parents=True, exist_ok=True)
    doc = result_doc(
        "service", cfg, describe_machine("cpu"), model=model, input_shape=list(shape),
        form=form, request_bytes=len(request.body), levels=levels, big_levels=big, ort=ort,
        ort_big=ort_big, ratios=ratios(cfg, levels, big, ort_big),
    )
    write_result(cfg.out, "service", doc, levels + big, service_markdown(doc))
    return doc


def _ratio_value(row: dict[str, Any]) -> str:
    if row["value"] is None:
        return "—"
    return f"{row['value']:.3g}" + ("" if row["met"] is None else (" ✓" if row["met"] else " ✗"))


def service_markdown(doc: dict[str, Any]) -> str:
    """The service result as markdown: levels, large requests, raw ORT and the ratios."""
    cfg = doc["config"]
    lines = [
        f"Model `{doc['model']}`, input {doc['input_shape']}, {cfg['batch']} image(s) per request "
        f"({doc['request_bytes']:,} bytes as {doc['form']}), ≤ {cfg['requests']} requests or "
        f"≤ {cfg['seconds']} s per level.\n\n",
        markdown_table(
            doc["levels"],
            ["form", "concurrency", "ok", "errors", "requests_per_s", "images_per_s", "p50_ms",
             "p95_ms", "p99_ms", "server_inference_p50_ms", "http_over_ort_p50",
             "http_over_ort_throughput"],
            ["form", "clients", "ok", "errors", "req/s", "img/s", "p50 ms", "p95 ms", "p99 ms",
             "server ORT p50 ms", "p50 ÷ raw ORT", "req/s ÷ raw ORT"],
        ),
    ]
    if doc["big_levels"]:
        lines += [
            f"\n{cfg['big_batch']}-image requests:\n\n",
            markdown_table(
                doc["big_levels"],
                ["form", "concurrency", "ok", "errors", "requests_per_s", "images_per_s",
                 "p50_ms", "p99_ms", "server_inference_p50_ms", "images_over_ort"],
                ["form", "clients", "ok", "errors", "req/s", "img/s", "p50 ms", "p99 ms",
                 "server ORT p50 ms", "img/s ÷ raw ORT"],
            ),
        ]
    if doc["ort"]:
        o = doc["ort"]
        lines.append(f"\nRaw ONNX Runtime in-process (sequential, batch {o['batch']}): "
                     f"{o['requests_per_s']:.1f} runs/s, p50 {o['p50_ms']:.3f} ms, "
                     f"p99 {o['p99_ms']:.3f} ms.\n")
    if doc["ort_big"]:
        o = doc["ort_big"]
        by = ", ".join(f"{t} thread(s) {v:,.0f}" for t, v in o["by_threads"].items())
        lines.append(f"Raw ONNX Runtime at batch {o['batch']}: {o['images_per_s']:,.0f} img/s "
                     f"(p50 {o['p50_ms']:.3f} ms; img/s by intra-op threads: {by}).\n")
    lines += ["\nRatios (issue 17):\n\n",
              markdown_table([{**r, "shown": _ratio_value(r)} for r in doc["ratios"]],
                             ["ratio", "shown", "target"], ["ratio", "measured", "target"])]
    return "".join(lines)
