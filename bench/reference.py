"""lipcert's layers against the comparison paper's own code, side by side in one process.

``python -m bench reference --reference-dir DIR`` times one training step (forward, ``sum()``,
backward, an SGD step: the step of the paper's ``evaluator/batch_times.py``) of each method's
convolution in lipcert and in a checkout of ``berndprach/1LipschitzLayersCompared`` at DIR, on the
same input (default: batch 64, 32 channels, 16×16, kernel 3). Nothing of the reference is copied
into lipcert: its layer modules are imported from DIR at run time (``lipnn/layers/lipschitz``,
loaded as a package of its own so its ``models`` package never shadows lipcert's). The reference
needs ``einops`` for LOT and SOC (it is in lipcert's ``dev`` extra).

The two layers of a method are timed alternately, one repeat of each in turn, so drifts of a
shared machine hit both; the table reports medians and the ratio lipcert ÷ reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.timing import median, time_call
from models.registry import layer_class
from training.tables import render_markdown

logger = logging.getLogger(__name__)

#: lipcert method → (module in ``lipnn/layers/lipschitz``, class) of the paper's code.
REFERENCE_LAYERS: dict[str, tuple[str, str]] = {
    "aol": ("aol", "AOLConv2d"),
    "bcop": ("bcop", "BCOP"),
    "cayley": ("cayley", "CayleyConv"),
    "cpl": ("cpl", "CPLConv2d"),
    "lot": ("lot", "LOT"),
    "sll": ("sll", "SLLConv2d"),
    "soc": ("soc", "SOC"),
    "sandwich": ("sandwich", "SandwichConv"),
}
#: Issue 17's targets for lipcert ÷ reference (every other method: at most 1).
TARGETS: dict[str, float] = {"soc": 0.7, "bcop": 0.7, "lot": 0.7}
_PACKAGE = "_lipcert_reference_layers"


@dataclass(frozen=True)
class ReferenceRow:
    method: str
    lipcert_ms: float | None
    reference_ms: float | None
    ratio: float | None
    target: float
    error: str = ""


def load_reference_package(root: Path) -> Any:
    """The paper's ``lipnn/layers/lipschitz`` folder at ``root``, imported as a package.

    Raises:
        ValueError: ``root`` is not a checkout of the paper's repository.
    """
    pkg_dir = Path(root) / "lipnn" / "layers" / "lipschitz"
    if not (pkg_dir / "aol.py").is_file():
        raise ValueError(
            f"--reference-dir {str(root)!r} has no lipnn/layers/lipschitz/aol.py; give a checkout "
            "of github.com/berndprach/1LipschitzLayersCompared"
        )
    if _PACKAGE in sys.modules:
        del sys.modules[_PACKAGE]
        for name in [n for n in sys.modules if n.startswith(_PACKAGE + ".")]:
            del sys.modules[name]
    init = pkg_dir / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        _PACKAGE, init if init.is_file() else None, submodule_search_locations=[str(pkg_dir)]
    )
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {pkg_dir} as a package")
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = package
    spec.loader.exec_module(package)
    return package


def reference_class(method: str) -> type[nn.Module]:
    """The paper's layer class of ``method`` (after :func:`load_reference_package`)."""
    module, cls = REFERENCE_LAYERS[method]
    return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), cls)


def _train_step(layer: nn.Module, x: torch.Tensor) -> Any:
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
        optimizer.step()

    return step


def compare_method(
    method: str, *, batch: int, channels: int, size: int, kernel: int, repeats: int, warmup: int
) -> ReferenceRow:
    """One method's row: both layers built, warmed up and timed alternately."""
    target = TARGETS.get(method, 1.0)
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    try:
        ours = layer_class(method)(channels, kernel).train()
        theirs = reference_class(method)(channels, channels, kernel).train()
        steps = (_train_step(ours, x), _train_step(theirs, x))
        for fn in steps:
            time_call(fn, repeats=1, warmup=warmup)
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeats):
            for fn, out in zip(steps, times, strict=True):
                out.extend(time_call(fn, repeats=1, warmup=0))
    except Exception as exc:  # the reference code may not run on this torch: say so, go on
        logger.warning("%s: %s: %s", method, type(exc).__name__, exc)
        return ReferenceRow(method, None, None, None, target, f"{type(exc).__name__}: {exc}")
    ms = [1e3 * median(t) for t in times]
    return ReferenceRow(method, ms[0], ms[1], ms[0] / ms[1], target)


def run_reference(
    reference_dir: Path,
    methods: list[str] | None,
    *,
    batch: int = 64,
    channels: int = 32,
    size: int = 16,
    kernel: int = 3,
    repeats: int = 20,
    warmup: int = 3,
    threads: int = 1,
    out: Path = Path("bench_results/reference"),
) -> list[ReferenceRow]:
    """Every method's row; writes ``reference.json`` and ``reference.md`` to ``out``.

    Raises:
        ValueError: a bad directory, method or size, naming what is allowed.
    """
    methods = list(REFERENCE_LAYERS) if methods is None else methods
    for m in methods:
        if m not in REFERENCE_LAYERS:
            raise ValueError(
                f"unknown method {m!r} for the reference; choose from {', '.join(REFERENCE_LAYERS)}"
            )
    for name, value in dict(batch=batch, channels=channels, size=size, repeats=repeats).items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    load_reference_package(reference_dir)
    shape = dict(batch=batch, channels=channels, size=size, kernel=kernel)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = [compare_method(m, **shape, repeats=repeats, warmup=warmup) for m in methods]
    finally:  # the caller's thread count (a test run in the same process trains afterwards)
        torch.set_num_threads(before)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(shape, repeats=repeats, warmup=warmup, threads=threads,
                reference_dir=str(reference_dir), torch=torch.__version__)
    (out / "reference.json").write_text(
        json.dumps(dict(meta, rows=[asdict(r) for r in rows]), indent=2)
    )
    (out / "reference.md").write_text(reference_markdown(rows, meta))
    return rows


def reference_markdown(rows: list[ReferenceRow], meta: dict[str, Any]) -> str:
    """The table: per method lipcert and reference ms per step, the ratio and its target."""

    def cell(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    body = [
        [
            r.method,
            cell(r.lipcert_ms, ".2f"),
            cell(r.reference_ms, ".2f"),
            cell(r.ratio, ".2f"),
            f"≤ {r.target:g}",
            "–" if r.ratio is None else ("yes" if r.ratio <= r.target else "no"),
            r.error,
        ]
        for r in rows
    ]
    head = (
        f"Training step (forward, backward, SGD), batch {meta['batch']}, {meta['channels']} "
        f"channels, {meta['size']}×{meta['size']}, k={meta['kernel']}, {meta['threads']} "
        f"thread(s), median of {meta['repeats']} alternating repeats\n\n"
    )
    return head + render_markdown(
        ["method", "lipcert ms", "reference ms", "lipcert ÷ ref", "target", "met", "error"], body
    )
