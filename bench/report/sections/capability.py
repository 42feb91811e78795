"""Capability matrix: the status of every case by method and mask, with the reasons."""
from __future__ import annotations

import numpy as np

from attnbench.report import plots
from attnbench.report.context import Context, length_sort
from attnbench.report.model import Cell, Section, Table, Text

# worst first: the colour of a capability cell is that of its worst status
SEVERITY = ("wrong", "crashed", "error", "timeout", "oom", "unsupported", "ok")


def section_capability(ctx: Context) -> Section:
    """Method × (mask · pattern [· layout]) matrix of statuses; reasons on hover and as numbered footnotes."""
    section = Section("capability", "Capability matrix")
    rows = ctx.rows
    column = rows["mask"] + " · " + rows["pattern"] + np.where(rows["layout"] == "single", "", " · " + rows["layout"])
    rows = rows.assign(column=column)
    columns = sorted(rows["column"].unique())
    labels = sorted(rows["label"].unique())
    notes: dict[tuple, int] = {}
    note_rows = []
    cells = {}
    for (label, col), cell_rows in rows.groupby(["label", "column"]):
        counts = cell_rows["status"].value_counts()
        ordered = [s for s in SEVERITY if s in counts] + [s for s in counts.index if s not in SEVERITY]
        worst = ordered[0]
        text = worst if len(ordered) == 1 else " · ".join(f"{s} {counts[s]}" for s in ordered)
        marks, titles = [], []
        failed = cell_rows[cell_rows["status"] != "ok"]
        for (status, reason), reason_rows in failed.groupby(["status", "reason"]):
            key = (label, col, status, reason)
            if key not in notes:
                notes[key] = len(notes) + 1
                lengths = ", ".join(plots.tokens(x) for x in length_sort(reason_rows["x"]))
                note_rows.append([str(notes[key]), Cell(status, status), label, col, str(len(reason_rows)),
                                  lengths, reason or "(no reason recorded)"])
            marks.append(f"[{notes[key]}]")
            titles.append(f"{status} ×{len(reason_rows)}: {reason or '(no reason recorded)'}")
        cells[(label, col)] = Cell(text + (" " + "".join(marks) if marks else ""), worst,
                                   "\n".join(titles) if titles else None)
    matrix = [[label, *[cells.get((label, col), Cell("not run")) for col in columns]] for label in labels]
    section.blocks.append(Text(
        "Each cell counts the cases of a method on a mask and pattern by status; its colour is the worst status "
        "present (order: " + ", ".join(SEVERITY) + "). Hover a cell for the reasons; numbers refer to the "
        "table of reasons below."))
    section.blocks.append(Table(["method", *columns], matrix, "Status of every case, by method and mask."))
    if note_rows:
        section.blocks.append(Table(["#", "status", "method", "mask · pattern", "cases", "lengths", "reason"],
                                    note_rows, "Reasons for every status but ok."))
    return section
