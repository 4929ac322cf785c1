"""Markdown and CSV text of a table whose cells are already formatted (one piece for the sweep's
comparison and for :mod:`bench.tables`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence


def render_markdown(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; ``|`` inside a cell becomes ``/``."""

    def line(cells: Iterable[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    lines = [line(header), "|" + "---|" * len(header)]
    lines += [line(row) for row in rows]
    return "\n".join(lines) + "\n"


def render_csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """CSV text (``\\n`` line ends; None as an empty cell)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
