"""Efficiency length (CAB): where each method's time and memory curves cross the baseline's."""
from __future__ import annotations

from attnbench.report import plots
from attnbench.report.context import Context, curve_baseline, in_group_order
from attnbench.report.maths import describe_crossing
from attnbench.report.model import Section, Table, Text
from attnbench.report.tables import without_blank


def section_efficiency_length(ctx: Context) -> Section:
    """CAB's efficiency length: where each method's time and memory curves cross the baseline's."""
    section = Section("efficiency-length", "Efficiency length")
    section.blocks.append(Text(
        "The sequence length from which a method is at least as fast (or as lean) as the baseline, where its "
        "curve crosses the baseline's from above. Curves are interpolated piecewise-linearly in log-log between "
        "measured lengths (a local power law between neighbours), not fitted by one power law: short lengths "
        "are launch-bound and long ones compute-bound, so one exponent misplaces the crossing. Crossings are "
        "never extrapolated beyond the measured range. Baseline per figure: "
        + (ctx.baseline if ctx.baseline else "the exact method fastest at most lengths.")))
    table = []
    kernel = ctx.kernel
    for (group, source), rows in in_group_order(kernel[(kernel["status"] == "ok") & (kernel["ms_median"] > 0)]):
        baseline = curve_baseline(rows, ctx.baseline)
        if baseline is None:
            continue
        base_label = rows.loc[rows["method"] == baseline, "label"].iloc[0]
        wide = rows.drop_duplicates(["x", "label"], keep="last").pivot(
            index="x", columns="label", values=["ms_median", "peak_mem_mb"]).sort_index()
        times, memory = wide["ms_median"], wide["peak_mem_mb"]
        for label in times.columns.drop(base_label):
            common = times[[label, base_label]].dropna().index
            if common.empty:
                continue
            seq = times.index.to_numpy(dtype=float)
            time = describe_crossing(seq, times[label], times[base_label], "at least as fast", "slower")
            lean = describe_crossing(seq, memory[label], memory[base_label], "at most as much memory", "more memory")
            table.append([group, source, label, baseline,
                          f"{plots.tokens(common.min())}–{plots.tokens(common.max())}", time, lean])
    if table:
        header, table = without_blank(["mask · pattern · mode · shape", "source", "method", "baseline",
                                       "measured range", "time: efficiency length", "memory: efficiency length"],
                                      table, "source")
        section.blocks.append(Table(header, table, "Efficiency length of each method against the baseline."))
    else:
        section.blocks.append(Text("No figure has a measured baseline and another measured method."))
    return section
