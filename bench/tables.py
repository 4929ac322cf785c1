"""Markdown and CSV files of flat result rows (one dict per row), on :mod:`training.tables`."""

from __future__ import annotations

from collections.abc import Sequence
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
