"""Markdown and CSV files of flat result rows (one dict per row), on :mod:`training.tables`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.tables import render_csv, render_markdown


def format_value(value: Any, digits: int = 3) -> str:
    """Numbers to ``digits`` significant figures (thousands kept whole), None as ``–``."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None
) -> str:
    """A GitHub markdown table of ``columns`` (missing keys print as ``–``)."""
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    return render_markdown(list(headers or columns), cells)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """All keys of all rows as columns, first-seen order."""
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and not isinstance(row[k], (dict, list))]
    text = render_csv(columns, ([row.get(c, "") for c in columns] for row in rows))
    path.write_text(text, encoding="utf-8")
    return path


def result_doc(
    benchmark: str, config: Any, machine: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """A bench result document: ``benchmark``, ``created``, the ``config`` dataclass (paths as
    text), the ``machine``, then ``fields``."""
    return dict(
        benchmark=benchmark,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        machine=machine,
        **fields,
    )


def write_result(
    out: Path, name: str, doc: dict[str, Any], rows: Sequence[dict[str, Any]], markdown: str
) -> None:
    """Write ``<name>.json`` (the document), ``<name>.csv`` (``rows``) and ``<name>.md``."""
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    write_csv(rows, out / f"{name}.csv")
    (out / f"{name}.md").write_text(markdown, encoding="utf-8")
