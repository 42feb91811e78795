"""Approximation error against speed: the Pareto front of approximate methods, from the column approx_err."""
from __future__ import annotations

import numpy as np
import pandas as pd

from attnbench.report import plots
from attnbench.report.context import Context, in_group_order, with_baseline
from attnbench.report.formatting import fmt
from attnbench.report.maths import pareto_front
from attnbench.report.model import Section, Table, Text, plot, status_cell
from attnbench.report.tables import without_blank

PANELS_PER_FIGURE = 3


def section_pareto(ctx: Context) -> Section | None:
    """Per figure group, at the longest length where approx_err was measured: approx_err against time per
    call, one point per method, the Pareto front, and the baseline's time; None when no ok row has approx_err."""
    frame = with_baseline(ctx.kernel, ctx.baseline)
    measured = frame[(frame["status"] == "ok") & (frame["ms_median"] > 0) & np.isfinite(frame["approx_err"])]
    if measured.empty:
        return None
    section = Section("pareto", "Approximation error against speed")
    section.blocks.append(Text(
        "approx_err is a method's distance from exact softmax attention (lower is better). For each mask, pattern, "
        "mode and shape, at the longest length where approx_err was measured: one point per method with a "
        "measured time and approx_err; dashed: the Pareto front (no other method is both faster and closer to "
        "exact attention); dotted: the baseline's time ("
        + (f"the method {ctx.baseline}" if ctx.baseline else "the fastest exact method with status ok") + "). "
        "Methods without approx_err (exact methods are gated on rel_err instead) are not points."))
    measured_keys = set(zip(measured["group"], measured["source"]))
    panels, table = [], []
    for (group, source), rows in in_group_order(frame):
        if (group, source) not in measured_keys:
            continue
        mine = measured[(measured["group"] == group) & (measured["source"] == source)]
        longest = mine["x"].max()
        points = mine[mine["x"] == longest]
        front = pareto_front(points["ms_median"], points["approx_err"], higher_is_better=False)
        on_front = set(points.index[front])
        at = rows[rows["x"] == longest]
        base = at.dropna(subset=["baseline_ms"])
        reference = None
        if len(base):
            reference = (float(base["baseline_ms"].iloc[0]), f"baseline {base['baseline_method'].iloc[0]}")
        panels.append(plots.ParetoPanel(
            f"{rows['figure'].iloc[0]}\n{rows['shape'].iloc[0]} · {plots.tokens(longest)}"
            + (f" · {source}" if source else ""),
            "approx_err (lower is better)",
            [plots.Points(label, m["ms_median"].to_numpy(), m["approx_err"].to_numpy())
             for label, m in points.groupby("label")],
            points[front].sort_values("ms_median")[["ms_median", "approx_err"]].to_numpy(), reference))
        listed = at[np.isfinite(at["approx_err"]) | ~at["is_exact"].astype(bool)]
        for index, row in listed.sort_values("label").iterrows():
            table.append([group, source, plots.tokens(longest), row["label"], status_cell(row),
                          fmt(row["approx_err"]), fmt(row["ms_median"]),
                          "no baseline" if pd.isna(row["speedup"]) else f"{fmt(row['speedup'])}×",
                          "yes" if index in on_front else ""])
    for start in range(0, len(panels), PANELS_PER_FIGURE):
        section.blocks.append(plot(
            f"pareto-{start}", "approximation error against time per call",
            "Dashed: the Pareto front (nothing is both faster and closer to exact attention); dotted: the baseline.",
            plots.pareto, "Approximation error against time per call", panels[start:start + PANELS_PER_FIGURE],
            ctx.palette))
    header, table = without_blank(["mask · pattern · mode · shape", "source", "length", "method", "status",
                                   "approx_err", "time (ms)", "speed-up", "on front"], table, "source")
    section.blocks.append(Table(header, table, "Approximation error and speed at the longest length where "
                                "approx_err was measured."))
    return section
