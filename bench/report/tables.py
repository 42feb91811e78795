"""Table builders shared by several sections."""
from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from attnbench.report import plots
from attnbench.report.context import length_sort
from attnbench.report.model import Cell


def without_blank(header: list[str], rows: list[list], name: str) -> tuple[list[str], list[list]]:
    """Drop column ``name`` when every row leaves it blank (e.g. "source" in a single-run report)."""
    index = header.index(name)
    if any(row[index] not in ("", None) for row in rows):
        return header, rows
    return header[:index] + header[index + 1:], [row[:index] + row[index + 1:] for row in rows]


def length_table(rows: pd.DataFrame, column: str, show: Callable[[float], str]) -> tuple[list[str], list[list]]:
    """Header and rows of a method × length table: ``show(value)`` for ok cases, the status (with the reason
    on hover) for the others, empty where the case was not planned. The last row of a (label, length) wins."""
    lengths = length_sort(rows["x"])
    cells: dict[str, dict[float, object]] = {}
    for label, x, status, value, reason in zip(rows["label"], rows["x"], rows["status"], rows[column], rows["reason"]):
        cells.setdefault(label, {})[x] = show(value) if status == "ok" else Cell(status, status, reason or None)
    table = [[label, *[cells[label].get(x, "") for x in lengths]] for label in sorted(cells)]
    header = [plots.tokens(x) for x in lengths]
    if rows["batch"].nunique() > 1:  # batch scaled with length: name it under each length
        batch = rows.drop_duplicates("x").set_index("x")["batch"]
        header = [f"{name} (b{batch[x]})" for name, x in zip(header, lengths)]
    return ["method", *header], table
