"""``python -m bench load``: what the re-audit at load costs, per method and size.

For every method, a model of the size is exported (:func:`certify.artifact.to_onnx`, untrained
weights: the cost does not depend on their values) and then loaded in a *fresh* process, as a
server does at start-up (no skeleton cache), timing each step of :func:`certify.artifact.load`:
rebuilding the skeleton, exporting it, comparing graphs, the audit, the ONNX Runtime session and
the parity check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.machine import describe_machine
from bench.tables import markdown_table, result_doc, write_result

STEPS = ("rebuild", "export", "compare", "audit", "session", "parity")


@dataclass(frozen=True)
class LoadTimeConfig:
    """What ``bench load`` measures.

    Args:
        methods: registered method names.
        size: network size (``xxs``, ``xs``, …).
        input_shape: ``(C, H, W)`` of the exported model.
        num_classes: classes of the head.
        threads: torch / ONNX Runtime threads of the loading process.
        out: folder for ``load.json``, ``load.csv``, ``load.md``.
    """

    methods: tuple[str, ...]
    size: str
    input_shape: tuple[int, int, int]
    num_classes: int
    threads: int
    out: Path


_CHILD = """
import json, sys, time, torch
torch.set_num_threads({threads})
t0 = time.perf_counter()
from certify.artifact import load
t1 = time.perf_counter()
artifact = load(sys.argv[1], threads={threads})
t2 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, **artifact.timings,
                      bound=artifact.audit.bound, parameters=artifact.parameters,
                      onnx_bytes=artifact.onnx_bytes)))
"""


def _measure(method: str, cfg: LoadTimeConfig, folder: Path) -> dict:
    from certify.artifact import to_onnx
    from models.registry import create_model

    c, h, _ = cfg.input_shape
    model = create_model(method, cfg.size, c, cfg.num_classes, h)
    path = folder / f"{method}.onnx"
    t0 = time.perf_counter()
    to_onnx(model, path, input_shape=cfg.input_shape)
    export_s = time.perf_counter() - t0
    res = subprocess.run([sys.executable, "-c", _CHILD.format(threads=cfg.threads), str(path)],
                         capture_output=True, text=True, check=True)
    row = json.loads(res.stdout.strip().splitlines()[-1])
    return dict(method=method, size=cfg.size, export_s=export_s, **row)


def run_load_time(cfg: LoadTimeConfig) -> list[dict]:
    """Measure every method; writes ``load.{json,csv,md}`` under ``cfg.out``."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in cfg.methods:
            rows.append(_measure(method, cfg, Path(tmp)))
    columns = ["method", "size", "parameters", "load_s", *STEPS, "export_s", "bound"]
    markdown = markdown_table(rows, columns)
    doc = result_doc("load", cfg, describe_machine("cpu"), rows=rows)
    write_result(cfg.out, "load", doc, rows, markdown)
    return rows


__all__ = ["LoadTimeConfig", "STEPS", "run_load_time"]
