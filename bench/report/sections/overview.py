"""Overview: the runs, their cases by status, and who is fastest and leanest per figure group."""
from __future__ import annotations

import pandas as pd

from attnbench.record.schema import STATUSES
from attnbench.report import plots
from attnbench.report.context import Context, in_group_order
from attnbench.report.formatting import fmt, shown
from attnbench.report.model import Cell, Section, Table, Text
from attnbench.report.tables import without_blank


def margin_text(ranked: pd.DataFrame) -> str:
    """How far the fastest of ``ranked`` (sorted by median) is ahead of the next: '2.31× over flex', or
    'within spread of flex' when the winner's p80 reaches the runner-up's p20."""
    if len(ranked) < 2:
        return "only one"
    first, second = ranked.iloc[0], ranked.iloc[1]
    ratio = second["ms_median"] / first["ms_median"]
    p80, p20 = first.get("ms_p80"), second.get("ms_p20")
    if pd.notna(p80) and pd.notna(p20) and p80 >= p20:
        return f"within spread of {second['method']} ({ratio:.2f}×)"
    return f"{ratio:.2f}× over {second['method']}"


def section_overview(ctx: Context) -> Section:
    """Runs, status counts, and the answer per figure group at its longest measured length."""
    section = Section("overview", "Overview")
    header = ["run", "device", "started", "rows", *STATUSES]
    table = []
    for run in ctx.runs:
        counts = run.rows["status"].value_counts()
        table.append([run.name, run.device, shown(run.env.get("started_at")), str(len(run.rows)),
                      *[Cell(str(counts.get(s, 0)), s if counts.get(s, 0) else None) for s in STATUSES]])
    section.blocks.append(Table(header, table, "Runs in this report, cases by status."))
    for run in ctx.runs:
        for warning in run.warnings:
            section.blocks.append(Text(f"Warning ({run.name}): {warning}"))
    layouts = ctx.rows[ctx.rows["kind"] == "cp"]
    if len(layouts):
        section.blocks.append(Text(
            f"{len(layouts)} case(s) ran on a context-parallel layout ({', '.join(sorted(set(layouts['layout'])))}); "
            "they are counted above and in the capability matrix, and left out of the single-device figures and "
            "tables below; the section on context-parallel layouts shows their scaling."))
    answers = []
    for (group, source), rows in in_group_order(ctx.kernel):
        ok = rows[(rows["status"] == "ok") & rows["ms_median"].notna()]
        if ok.empty:
            answers.append([group, source, "", Cell("no method measured", "error"), "", "", "", ""])
            continue
        longest = ok["x"].max()
        at = ok[ok["x"] == longest]
        exact = at[at["is_exact"]].sort_values("ms_median")
        fastest = at.sort_values("ms_median").iloc[0]
        lean = at.dropna(subset=["peak_mem_mb"]).sort_values("peak_mem_mb")
        failed = rows[(rows["x"] >= longest) & (rows["status"] != "ok") & (rows["status"] != "unsupported")]
        failed_text = ", ".join(sorted({f"{m} ({s})" for m, s in zip(failed["method"], failed["status"])}))
        answers.append([
            group, source, plots.tokens(longest),
            f"{exact.iloc[0]['method']} ({fmt(exact.iloc[0]['ms_median'])} ms)" if len(exact) else "none ok",
            margin_text(exact),
            f"{fastest['method']} ({fmt(fastest['ms_median'])} ms" + ("" if fastest["is_exact"] else ", approximate")
            + ")",
            f"{lean.iloc[0]['method']} ({fmt(lean.iloc[0]['peak_mem_mb'])} MiB)" if len(lean) else "",
            failed_text,
        ])
    if answers:
        header, answers = without_blank(
            ["mask · pattern · mode · shape", "source", "longest length", "fastest exact", "ahead of the next exact",
             "fastest", "leanest (peak memory)", "failed at ≥ that length"], answers, "source")
        section.blocks.append(Table(header, answers,
                                    "At the longest length where any method ran: who is fastest and leanest. The "
                                    "margin is the next exact method's median over the winner's; 'within spread' "
                                    "when their p20–p80 ranges overlap."))
    flagged = ctx.rows[ctx.rows["flags"].notna() & (ctx.rows["flags"].astype(str) != "")]
    if len(flagged):
        section.blocks.append(Table(
            ["method", "mask", "mode", "length", "flags"],
            [[r["label"], r["mask"], r["mode"], plots.tokens(r["x"]) if pd.notna(r["x"]) else "", r["flags"]]
             for _, r in flagged.iterrows()],
            "Sanity flags raised while measuring (check these rows before trusting them).",
            collapsed=len(flagged) > 10))
    return section
