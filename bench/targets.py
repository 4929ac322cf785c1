"""Issue 17's targets for exported models: ONNX ÷ exported standard, and eager ÷ ONNX.

Read from a ``bench layers`` result's rows (:func:`bench.layers.run_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.complexity import soc_eval_terms
from training.tables import render_markdown

BASELINE = "standard"


def export_target(method: str) -> float | None:
    """Issue 17's bound on exported ONNX ÷ exported standard (every batch), None: no target.

    AOL and BCOP export one circular convolution (≤ 1.05), CPL and SLL two (≤ 2), Cayley and LOT
    a per-frequency form (≤ 1.5), SOC its polynomial's terms (≤ terms + 1 at k = 3).
    """
    if method == "soc":
        return float(soc_eval_terms(3) + 1)
    return {"aol": 1.05, "bcop": 1.05, "cpl": 2.0, "sll": 2.0, "cayley": 1.5, "lot": 1.5}.get(
        method
    )


def targets_markdown(rows: list[dict[str, Any]], batches: Sequence[int]) -> str:
    """Issue 17's export targets per method: ONNX ÷ standard and eager ÷ ONNX, met or not.

    Eager ÷ ONNX must be ≥ 2 at batch 1 and ≥ 1 (not slower) at the other batches.
    """

    def verdict(value: Any, ok: bool) -> str:
        if not isinstance(value, (int, float)):
            return "–"
        return f"{value:.3g} {'✓' if ok else '✗'}"

    body = []
    for row in rows:
        if row["method"] == BASELINE:
            continue
        target = export_target(row["method"])
        cells = [row["method"], row["size"], "–" if target is None else f"≤ {target:g}"]
        for b in batches:
            v = row.get(f"onnx_ms_b{b}_vs_standard")
            cells.append(verdict(v, target is None or (v is not None and v <= target)))
        for b in batches:
            v = row.get(f"onnx_speedup_b{b}")
            need = 2.0 if b == 1 else 1.0
            cells.append(verdict(v, v is not None and v >= need))
        body.append(cells)
    heads = ["method", "size", "ONNX ÷ std target"]
    heads += [f"ONNX ÷ std b{b}" for b in batches]
    heads += [f"eager ÷ ONNX b{b} (≥ {2 if b == 1 else 1})" for b in batches]
    return render_markdown(heads, body)
