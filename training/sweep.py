"""Comparison tables of finished runs (markdown and CSV), as a sweep writes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from certify.radius import eps_key
from training.config import EVAL_EPS
from training.tables import render_csv, render_markdown


def eps_name(eps: float) -> str:
    """``36/255`` for a whole number of 255ths below 1, else the number (``1.0``)."""
    steps = eps * 255
    return f"{round(steps)}/255" if eps < 1 and abs(steps - round(steps)) < 1e-9 else f"{eps}"


_EPS_NAMES = {eps_key(e): eps_name(e) for e in EVAL_EPS}


def _columns(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    eps = []
    for r in reports:
        for k in r.get("certified_accuracy") or {}:
            if k not in eps:
                eps.append(k)
    return eps


def comparison_rows(reports: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one per run (a failed run has ``error`` and blanks elsewhere).

    Accuracies in percent with one decimal; times in seconds; memory in MiB.
    """
    eps = _columns(reports)
    header = (
        ["method", "size", "dataset", "clean %"]
        + [f"CRA {_EPS_NAMES.get(k, k)} %" for k in eps]
        + [
            "bound L",
            "certificate",
            "params",
            "train s",
            "epochs",
            "img/s",
            "peak MiB",
            "NaN restarts",
            "error",
        ]
    )
    rows = []
    for r in reports:
        cra = r.get("certified_accuracy") or {}

        def pct(v: Any) -> str:
            return "" if v is None else f"{100 * float(v):.1f}"

        def num(v: Any, fmt: str) -> str:
            return "" if v is None else format(float(v), fmt)

        rows.append(
            [
                str(r.get("method", "")),
                str(r.get("size", "")),
                str(r.get("dataset", "")),
                pct(r.get("clean_accuracy")),
            ]
            + [pct(cra.get(k)) for k in eps]
            + [
                num(r.get("lipschitz_bound"), ".4f"),
                str(r.get("certificate", "")),
                str(r.get("parameters", "")),
                num(r.get("train_time_s"), ".1f"),
                num(r.get("epochs"), ".2f"),
                num(r.get("images_per_s"), ".0f"),
                num(
                    None if r.get("peak_memory_bytes") is None else r["peak_memory_bytes"] / 2**20,
                    ".0f",
                ),
                str(r.get("nan_restarts", "")),
                str(r.get("error", "")),
            ]
        )
    return header, rows


def comparison_markdown(reports: Sequence[Mapping[str, Any]]) -> str:
    """The comparison as a markdown table."""
    return render_markdown(*comparison_rows(reports))


def comparison_csv(reports: Sequence[Mapping[str, Any]]) -> str:
    """The comparison as CSV text."""
    return render_csv(*comparison_rows(reports))


def write_comparison(reports: Sequence[Mapping[str, Any]], stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv``.

    Returns:
        The two paths.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, csv_path = stem.with_suffix(".md"), stem.with_suffix(".csv")
    md.write_text(comparison_markdown(reports))
    csv_path.write_text(comparison_csv(reports))
    return md, csv_path
