"""``python -m bench report``: training reports + bench results → one table and the paper's plots.

Inputs are training reports (``runs/<dataset>/<method>-<size>-<stamp>/report.json``) and the
``layers.json`` of ``bench layers``; they are joined on (method, size). Outputs:

- ``report.md`` / ``report.csv`` / ``report.json``: one row per training run with its accuracy,
  certified robust accuracy (CRA) per ε, training figures, and the bench figures of its
  method × size;
- ``radar-<dataset>-<size>.png``: the comparison paper's radar ("star") plot (Prach et al.,
  CVPR 2024, Fig. 1), one polygon per method over RA, A, TT, IT, TM, IM. Every axis is
  normalized so that higher is better and the best method sits on the rim (1.0): accuracies
  relative to the best (``v / max``), times and memories inverted relative to the best
  (``min / v``). The paper bins the same comparison into scores 1–5; we plot the ratios
  unbinned. A missing figure is drawn at 0 and listed in ``report.md``;
- ``cra-<dataset>.png``: CRA against ε (ε = 0 is the clean accuracy), one line per run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from bench.tables import markdown_table, write_csv

log = logging.getLogger(__name__)

RADAR_AXES = ("RA", "A", "TT", "IT", "TM", "IM")
# Higher is better for the accuracies, lower for the costs.
_COST_AXES = ("TT", "IT", "TM", "IM")

# Training-report key spellings tried in order (the training helper's names first).
_REPORT_KEYS: dict[str, tuple[str, ...]] = {
    "clean_accuracy": ("clean_accuracy", "accuracy", "test_accuracy"),
    "certified_accuracy": ("certified_accuracy", "cra", "certified_robust_accuracy"),
    "train_seconds": ("train_seconds", "training_seconds", "train_time_s", "elapsed_seconds"),
    "train_images_per_s": ("images_per_s", "train_images_per_s", "images_per_second",
                           "throughput_images_per_s"),
    "train_peak_memory_mb": ("peak_memory_mb", "train_peak_memory_mb", "peak_mem_mb"),
    "epochs": ("epochs", "epochs_done"),
}


def parse_epsilon(text: str | float) -> float:
    """``"0.1412"``, ``"36/255"`` or a number → float; ValueError otherwise."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError) as err:
        raise ValueError(f"not an epsilon: {text!r} (use a decimal or a fraction like 36/255)") \
            from err


def _get(report: dict[str, Any], name: str) -> Any:
    for key in _REPORT_KEYS[name]:
        if report.get(key) is not None:
            return report[key]
        for nested in ("metrics", "results", "final"):
            if isinstance(report.get(nested), dict) and report[nested].get(key) is not None:
                return report[nested][key]
    if name == "train_peak_memory_mb":
        for key in ("peak_memory_bytes", "train_peak_memory_bytes"):
            if report.get(key) is not None:
                return report[key] / 2**20
    return None


def normalize_training_report(report: dict[str, Any], source: str) -> dict[str, Any]:
    """The fields the report uses, under one spelling; ValueError without method and size."""
    if not report.get("method") or not report.get("size"):
        raise ValueError(f"{source}: a training report needs 'method' and 'size'")
    cra = _get(report, "certified_accuracy") or {}
    if not isinstance(cra, dict):
        raise ValueError(f"{source}: certified_accuracy must map ε to a fraction, got {cra!r}")
    row = dict(
        dataset=str(report.get("dataset", "unknown")), method=str(report["method"]).lower(),
        size=str(report["size"]).lower(), run=source,
        clean_accuracy=_get(report, "clean_accuracy"),
        certified_accuracy={str(k): float(v) for k, v in cra.items()},
    )
    for name in ("train_seconds", "train_images_per_s", "train_peak_memory_mb", "epochs"):
        row[name] = _get(report, name)
    return row


def discover(paths: Sequence[Path]) -> tuple[list[tuple[Path, dict]], list[tuple[Path, dict]]]:
    """Training reports and bench ``layers`` documents found under ``paths``.

    A file is read as JSON; a folder is searched recursively for ``report.json`` and
    ``layers.json``. Documents with ``"benchmark": "layers"`` are bench results.

    Raises:
        ValueError: a path that does not exist or a file that is not JSON.
    """
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(p.rglob("report.json")) + sorted(p.rglob("layers.json"))
        else:
            raise ValueError(f"{p} does not exist")
    reports, benches = [], []
    for f in dict.fromkeys(files):
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{f} is not a readable JSON file: {err}") from err
        if isinstance(doc, dict) and doc.get("benchmark") == "layers":
            benches.append((f, doc))
        elif isinstance(doc, dict) and doc.get("benchmark") == "report":
            continue  # our own output, when the output folder lies under a searched one
        elif isinstance(doc, dict):
            reports.append((f, doc))
    return reports, benches


def _bench_index(benches: Sequence[tuple[Path, dict]]) -> tuple[dict, list[int]]:
    """(method, size) → bench row (later documents win), and the union of inference batches."""
    index: dict[tuple[str, str], dict[str, Any]] = {}
    batches: set[int] = set()
    for _, doc in benches:
        batches.update(int(b) for b in doc.get("config", {}).get("infer_batches", []))
        for row in doc.get("results", []):
            index[(row["method"], row["size"])] = row
    return index, sorted(batches)


def pick_epsilon(rows: Sequence[dict[str, Any]], wanted: str | None) -> str | None:
    """The ε key (as the reports spell it) closest to ``wanted`` (default 36/255)."""
    keys = {k for r in rows for k in r["certified_accuracy"]}
    if not keys:
        return None
    target = parse_epsilon(wanted) if wanted is not None else 36 / 255
    return min(keys, key=lambda k: abs(parse_epsilon(k) - target))


def radar_values(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per row (keyed by method): each radar axis normalized to (0, 1], best = 1, None if
    missing."""
    out: dict[str, dict[str, float | None]] = {r["method"]: {} for r in rows}
    for axis in RADAR_AXES:
        vals = {r["method"]: r.get(f"axis_{axis}") for r in rows}
        present = {m: v for m, v in vals.items() if isinstance(v, (int, float)) and v > 0}
        for m in out:
            v = present.get(m)
            if v is None:
                out[m][axis] = 0.0 if axis in ("RA", "A") and vals[m] == 0 else None
            elif axis in _COST_AXES:
                out[m][axis] = min(present.values()) / v
            else:
                out[m][axis] = v / max(present.values())
    return out


def _axes_of(row: dict[str, Any], bench: dict[str, Any] | None, eps: str | None,
             big: int | None) -> dict[str, Any]:
    """Raw radar figures of one joined row: bench measurements first, training report second."""
    b = bench or {}
    tt = b.get("train_ms")
    if tt is None and row.get("train_images_per_s"):
        tt = 1e3 / row["train_images_per_s"]  # ms per image: same ordering as ms per step
    it = b.get(f"onnx_ms_b{big}") if big else None
    if it is None and big:
        it = b.get(f"eager_ms_b{big}")
    return dict(
        axis_RA=row["certified_accuracy"].get(eps) if eps else None,
        axis_A=row.get("clean_accuracy"),
        axis_TT=tt, axis_IT=it,
        axis_TM=b.get("train_peak_mb", row.get("train_peak_memory_mb")),
        axis_IM=b.get("infer_peak_mb", b.get("onnx_peak_mb")),
    )


def build_report(
    runs: Sequence[Path], bench_files: Sequence[Path], out: Path, *, epsilon: str | None = None
) -> dict[str, Any]:
    """Join, tabulate and plot; writes into ``out``.

    Args:
        runs: run folders, report files, folders to search, or bench ``layers.json`` files.
        bench_files: further bench ``layers.json`` files.
        out: output folder.
        epsilon: the ε of the RA axis (default: the reports' ε nearest 36/255).

    Returns:
        The report document, with ``files`` naming everything written.

    Raises:
        ValueError: nothing to report, unreadable inputs, or reports without method/size.
    """
    reports, benches = discover([*runs, *bench_files])
    if not reports:
        raise ValueError(
            f"no training report (report.json) found under {', '.join(map(str, runs))}"
        )
    rows = [normalize_training_report(doc, str(path.parent)) for path, doc in reports]
    bench, batches = _bench_index(benches)
    big = max(batches) if batches else None
    eps = pick_epsilon(rows, epsilon)
    eps_keys = sorted({k for r in rows for k in r["certified_accuracy"]}, key=parse_epsilon)
    joined = []
    for row in rows:
        b = bench.get((row["method"], row["size"]))
        if b is None:
            log.warning("no bench result for %s-%s", row["method"], row["size"])
        flat = {k: v for k, v in row.items() if k != "certified_accuracy"}
        flat.update({f"cra_{k}": row["certified_accuracy"].get(k) for k in eps_keys})
        for key in ("params", "train_ms", "train_images_per_s", "train_peak_mb", "infer_peak_mb",
                    "onnx_peak_mb", *[f"{p}_ms_b{n}" for p in ("eager", "onnx") for n in batches]):
            flat[f"bench_{key}"] = (b or {}).get(key)
        flat.update(_axes_of(row, b, eps, big))
        flat["certified_accuracy"] = row["certified_accuracy"]
        joined.append(flat)

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in joined:
        groups.setdefault((r["dataset"], r["size"]), []).append(r)
    radar: dict[str, Any] = {}
    for (dataset, size), group in sorted(groups.items()):
        # One polygon per method: the latest run of a method (sorted run paths end in the stamp).
        latest = {r["method"]: r for r in sorted(group, key=lambda r: r["run"])}
        vals = radar_values(list(latest.values()))
        for r in group:
            if latest[r["method"]] is r:
                r.update({f"radar_{a}": vals[r["method"]][a] for a in RADAR_AXES})
        name = f"radar-{dataset}-{size}"
        files[name] = str(plot_radar(vals, out / f"{name}.png", f"{dataset}, size {size}"
                                     + (f", RA at ε={eps}" if eps else "")))
        radar[f"{dataset}/{size}"] = vals
    for dataset in sorted({r["dataset"] for r in joined}):
        name = f"cra-{dataset}"
        files[name] = str(plot_cra([r for r in joined if r["dataset"] == dataset],
                                   out / f"{name}.png", dataset))

    doc = dict(benchmark="report", epsilon=eps, rows=joined, radar=radar,
               inputs=dict(reports=[str(p) for p, _ in reports],
                           bench=[str(p) for p, _ in benches]))
    files["json"] = str(out / "report.json")
    files["csv"] = str(write_csv(joined, out / "report.csv"))
    files["markdown"] = str(out / "report.md")
    doc["files"] = files
    (out / "report.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(doc, eps_keys, batches), encoding="utf-8")
    return doc


def report_markdown(doc: dict[str, Any], eps_keys: Sequence[str], batches: Sequence[int]) -> str:
    """The joined table, the radar values and the plots as markdown."""
    rows = doc["rows"]
    cols = ["dataset", "method", "size", "clean_accuracy", *[f"cra_{k}" for k in eps_keys],
            "train_seconds", "train_images_per_s", "bench_train_ms",
            *[f"bench_onnx_ms_b{b}" for b in batches], "bench_train_peak_mb",
            "bench_infer_peak_mb"]
    heads = ["dataset", "method", "size", "A", *[f"CRA ε={k}" for k in eps_keys], "train s",
             "train img/s", "bench train ms", *[f"ONNX ms b{b}" for b in batches],
             "train MiB", "infer MiB"]
    parts = ["## Training runs joined with bench results\n\n", markdown_table(rows, cols, heads)]
    ranked = [r for r in rows if "radar_A" in r]
    parts.append(f"\n## Radar axes (best = 1; RA at ε = {doc['epsilon']})\n\n")
    parts.append(markdown_table(ranked, ["dataset", "size", "method",
                                         *[f"radar_{a}" for a in RADAR_AXES]],
                                ["dataset", "size", "method", *RADAR_AXES]))
    missing = [f"{r['method']}-{r['size']}: {a}" for r in ranked for a in RADAR_AXES
               if r.get(f"radar_{a}") is None]
    if missing:
        parts.append("\nMissing figures (drawn at 0): " + "; ".join(missing) + "\n")
    parts.append("\n" + "\n".join(f"![{k}]({Path(v).name})" for k, v in doc["files"].items()
                                  if v.endswith(".png")) + "\n")
    return "".join(parts)


def plot_radar(values: dict[str, dict[str, float | None]], path: Path, title: str) -> Path:
    """The radar plot: one closed polygon per method over :data:`RADAR_AXES` (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    angles = [2 * math.pi * i / len(RADAR_AXES) for i in range(len(RADAR_AXES))]
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw=dict(polar=True))
    try:
        for method, vals in sorted(values.items()):
            r = [vals[a] or 0.0 for a in RADAR_AXES]
            ax.plot([*angles, angles[0]], [*r, r[0]], label=method, linewidth=1.5)
            ax.fill([*angles, angles[0]], [*r, r[0]], alpha=0.08)
        ax.set_xticks(angles)
        ax.set_xticklabels(RADAR_AXES)
        ax.set_ylim(0, 1.05)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0])
        ax.set_title(title, pad=20)
        ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_cra(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Certified robust accuracy against ε, one line per run (ε = 0: clean accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for r in sorted(rows, key=lambda r: (r["method"], r["size"], r["run"])):
            pts = sorted((parse_epsilon(k), v) for k, v in r["certified_accuracy"].items())
            if r.get("clean_accuracy") is not None:
                pts = [(0.0, float(r["clean_accuracy"])), *pts]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{r['method']}-{r['size']}")
        ax.set_xlabel("ε (L2, [0,1] pixels)")
        ax.set_ylabel("certified robust accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
