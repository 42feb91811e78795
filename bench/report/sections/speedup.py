"""Speed-up of every method over the baseline, per case."""
from __future__ import annotations

import numpy as np
import pandas as pd

from attnbench.report import plots
from attnbench.report.context import Context, group_order, with_baseline
from attnbench.report.formatting import fmt
from attnbench.report.model import Section, Table, Text, plot
from attnbench.report.tables import length_table


def section_speedup(ctx: Context) -> Section:
    """Speed-up over the baseline per case: a summary matrix and per-length tables."""
    section = Section("speedup", "Speed-up against the baseline")
    frame = with_baseline(ctx.kernel, ctx.baseline)
    rule = (f"the method {ctx.baseline}" if ctx.baseline else
            "the fastest exact method with status ok in each case (so no exact method exceeds 1)")
    section.blocks.append(Text(f"Speed-up = baseline time / method time; above 1 is faster. Baseline: {rule}."))
    missing = frame[frame["baseline_ms"].isna()]["case_key"].nunique()
    if missing:
        section.blocks.append(Text(f"{missing} case(s) have no measured baseline; their speed-up is not shown."))
    measured = frame[frame["speedup"] > 0]
    if measured.empty:
        section.blocks.append(Text("No case has both a measured baseline and a measured method."))
        return section
    measured = measured.assign(column=measured["mask"] + " · " + measured["pattern"] + " · " + measured["mode"])
    geo = measured.groupby(["label", "column"])["speedup"].apply(lambda s: float(np.exp(np.log(s).mean())))
    matrix = geo.unstack()
    section.blocks.append(plot(
        "speedup-summary", "speed-up summary", "—: no case with both the method and the baseline measured.",
        plots.heatmap, "Geometric-mean speed-up over the baseline (all shapes and lengths)",
        matrix.to_numpy(dtype=float), list(matrix.index), list(matrix.columns), "speed-up (×)", center=1.0))
    summary = []
    for (label, column), r in measured.groupby(["label", "column"]):
        best, worst = r.loc[r["speedup"].idxmax()], r.loc[r["speedup"].idxmin()]
        summary.append([label, column, str(len(r)), fmt(geo[(label, column)]),
                        f"{fmt(worst['speedup'])} at {plots.tokens(worst['x'])}",
                        f"{fmt(best['speedup'])} at {plots.tokens(best['x'])}"])
    section.blocks.append(Table(["method", "mask · pattern · mode", "cases", "geomean", "lowest", "highest"],
                                summary, "Speed-up over the baseline, summarised over shapes and lengths."))
    for group in group_order(frame):
        rows = frame[frame["group"] == group]
        header, table = length_table(rows, "speedup", lambda v: "no baseline" if pd.isna(v) else f"{fmt(v)}×")
        base_names = sorted(set(rows["baseline_method"].dropna()))
        section.blocks.append(Table(header, table,
                                    f"Speed-up, {group} (baseline: {', '.join(base_names) or 'none'}).",
                                    collapsed=True))
    return section
