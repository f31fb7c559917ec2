"""Metric tables for people (a rich table on the terminal) and for programs (a JSON file).

``rows`` everywhere is an ordered mapping ``row label -> {metric name -> value}``; columns are the union
of metric names in first-seen order, and a metric a row lacks shows as "-" (JSON: absent).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def metric_columns(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Union of the rows' metric names, in the order they first appear."""
    seen: dict[str, None] = {}
    for metrics in rows.values():
        for name in metrics:
            seen.setdefault(name, None)
    return list(seen)


def format_value(value: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` significant digits (integers as they are); None/NaN as "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}"
    return str(value)


def metrics_table(
    rows: Mapping[str, Mapping[str, Any]], title: str | None = None, row_header: str = "setting", digits: int = 4
) -> Table:
    """A rich ``Table``: one row per entry of ``rows``, one column per metric."""
    columns = metric_columns(rows)
    table = Table(title=title, show_lines=False)
    table.add_column(row_header, style="bold", no_wrap=True)
    for name in columns:
        # On a narrow terminal a header folds onto a second line instead of being cut to "shape…".
        table.add_column(name, justify="right", overflow="fold")
    for label, metrics in rows.items():
        table.add_row(label, *(format_value(metrics.get(name), digits) for name in columns))
    return table


def print_metrics_table(
    rows: Mapping[str, Mapping[str, Any]],
    title: str | None = None,
    console: Console | None = None,
    row_header: str = "setting",
) -> None:
    """Print :func:`metrics_table` to ``console``.

    The default console is stdout; when stdout is not a terminal (a log file, a pipe) it is made wide
    enough for the whole table, since nobody can resize a log file.
    """
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=table_width(rows, row_header))
    console.print(metrics_table(rows, title=title, row_header=row_header))


def table_width(rows: Mapping[str, Mapping[str, Any]], row_header: str = "setting") -> int:
    """Characters needed to print :func:`metrics_table` without wrapping or truncation."""
    columns = metric_columns(rows)
    first = max([len(row_header), *(len(label) for label in rows)])
    widths = [max([len(name), *(len(format_value(m.get(name))) for m in rows.values())]) for name in columns]
    return first + sum(widths) + 3 * (len(columns) + 1) + 1


def _jsonable(value: Any) -> Any:
    # NaN/inf are not JSON; a metric that could not be computed is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, atomically (temp file + rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(_jsonable(payload), fh, indent=2, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)
    return path
