"""Scaling: the measured log-log slope of time against length per method, its figures at the longest length,
the lengths that did not run ok, and each method's forward rate against the baseline's (issues 9 and 10)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from attnbench.report import plots
from attnbench.report.context import Context, curve_baseline, in_group_order
from attnbench.report.formatting import fmt
from attnbench.report.maths import SLOPE_MIN_POINTS, scaling_fit
from attnbench.report.model import Cell, Section, Table, Text, status_cell
from attnbench.report.tables import length_table

RATE_TARGET = 0.80  # issue 9: the attention part at >= 80 % of the dense baseline's forward rate (32K-64K)
DEFAULT_RATE_BASELINE = "sdpa_cudnn"  # the dense exact yardstick of the committed runs, when no --baseline


def section_scaling(ctx: Context) -> Section | None:
    """Per (mask, pattern, mode, shape): a slope table, then per forward group a rate-against-baseline table;
    None when the runs have no single-device kernel rows."""
    kernel = ctx.kernel
    if kernel.empty:
        return None
    section = Section("scaling", "Scaling with sequence length")
    section.blocks.append(Text(
        f"Slope: the least-squares slope of log(median time per call) against log(length) over a method's ok "
        f"lengths >= {plots.tokens(ctx.slope_from)} tokens (--slope-from), or over its longest "
        f"{SLOPE_MIN_POINTS} ok lengths when fewer reach that; no slope from fewer than {SLOPE_MIN_POINTS} "
        "lengths. 2 is quadratic, 1 linear; for decode it is the per-step latency against the context length, "
        "so a flat (recurrent-state) step is ~0 and a step reading the whole KV cache ~1. The length is the "
        "key/value length. The time and throughput columns are at the longest length any method of the table ran "
        "ok; TFLOP/s on visible pairs is the mask's work (attention-equivalent for approximate methods), on "
        "attended pairs the work the method reports doing. 'not ok' lists every length that did not run ok, "
        "so a curve that stops early is visible."))
    for (group, source), rows in in_group_order(kernel):
        section.blocks.extend(scaling_blocks(rows, group, source, ctx.slope_from))
    section.blocks.extend(rate_blocks(ctx))
    return section


def scaling_blocks(rows: pd.DataFrame, group: str, source: str, slope_from: int) -> list:
    """The slope table of one figure group (one source), and a note naming methods unsupported everywhere."""
    where = group + (f" · {source}" if source else "")
    statuses = rows.groupby("label")["status"].agg(set)
    unsupported = sorted(label for label, s in statuses.items() if s == {"unsupported"})
    labels = sorted(label for label in statuses.index if label not in unsupported)
    note = [Text(f"{where}: unsupported at every length: {', '.join(unsupported)}.")] if unsupported else []
    if not labels:
        return note
    rows = rows[rows["label"].isin(labels)].drop_duplicates(["label", "x"], keep="last")
    measured = rows[(rows["status"] == "ok") & (rows["ms_median"] > 0)]
    longest = measured["x"].max() if len(measured) else rows["x"].max()
    at = plots.tokens(longest)
    attended = bool(np.isfinite(rows["tflops_attended"]).any())
    decode = bool((rows["mode"] == "decode").all())
    header = ["method", "slope", "fitted lengths", "points", f"ms at {at}", f"TFLOP/s at {at} (visible pairs)"]
    if attended:
        header.append(f"TFLOP/s at {at} (attended pairs)")
    if decode:
        header.append(f"GB/s at {at}")
    header += ["longest ok, if shorter", "not ok"]
    table = []
    for label in labels:
        mine = rows[rows["label"] == label].sort_values("x")
        ok = mine[(mine["status"] == "ok") & (mine["ms_median"] > 0)]
        fit = scaling_fit(ok["x"], ok["ms_median"], slope_from)
        if fit.slope is None:
            cells = [label, Cell(f"no slope: {len(ok)} length{'' if len(ok) == 1 else 's'} ran ok, a slope needs "
                                 f"{SLOPE_MIN_POINTS}"), "", str(len(ok))]
        else:
            cells = [label, f"{fit.slope:.2f}", ", ".join(plots.tokens(x) for x in fit.lengths), str(len(fit.lengths))]
        there = mine[mine["x"] == longest]
        if there.empty:
            figures = ["not run"] + [""] * (1 + attended + decode)
        elif there["status"].iloc[0] != "ok":
            figures = [status_cell(there.iloc[0])] + [""] * (1 + attended + decode)
        else:
            row = there.iloc[0]
            figures = [fmt(row["ms_median"]), fmt(row["tflops"])]
            figures += [fmt(row["tflops_attended"])] if attended else []
            figures += [fmt(row["gbps"])] if decode else []
        shorter = ""
        if len(ok) and ok["x"].max() < longest:
            last = ok.iloc[-1]
            shorter = f"{plots.tokens(last['x'])}: {fmt(last['ms_median'])} ms, {fmt(last['tflops'])} TFLOP/s"
        table.append([*cells, *figures, shorter, not_ok_cell(mine)])
    caption = (f"Scaling of the per-step time with context length, {where}." if decode else
               f"Scaling of the time per call with length, {where}.")
    if "batch varies" in group or "b×seq_q" in group:
        caption += (" The batch changes with the length here, so the slope is of the call time, not of the "
                    "time per sequence (at constant tokens per call, add 1 for the per-sequence exponent).")
    return [Table(header, table, caption), *note]


def not_ok_cell(mine: pd.DataFrame) -> Cell | str:
    """"512k: timeout, 1M: oom" (or "every length: oom"), with each reason on hover; empty when all ran ok."""
    failed = mine[mine["status"] != "ok"]
    if failed.empty:
        return ""
    reasons = "; ".join(f"{plots.tokens(x)}: {status}: {reason}" if reason else f"{plots.tokens(x)}: {status}"
                        for x, status, reason in zip(failed["x"], failed["status"], failed["reason"]))
    if len(failed) == len(mine) and failed["status"].nunique() == 1:
        return Cell(f"every length: {failed['status'].iloc[0]}", None, reasons)
    return Cell(", ".join(f"{plots.tokens(x)}: {s}" for x, s in zip(failed["x"], failed["status"])), None, reasons)


def rate_baseline(rows: pd.DataFrame, baseline: str | None) -> str | None:
    """The baseline of a forward group: --baseline, else sdpa_cudnn where it ran ok, else the exact method
    fastest at most lengths (``curve_baseline``)."""
    if baseline:
        return curve_baseline(rows, baseline)
    ok = rows[(rows["status"] == "ok") & (rows["ms_median"] > 0)]
    if (ok["method"] == DEFAULT_RATE_BASELINE).any():
        return DEFAULT_RATE_BASELINE
    return curve_baseline(rows, None)


def rate_of(rows: pd.DataFrame) -> pd.Series:
    """A row's forward rate for the comparison: TFLOP/s on attended pairs where recorded, else on visible pairs."""
    return rows["tflops_attended"].where(np.isfinite(rows["tflops_attended"]), rows["tflops"])


def plain(cell):
    """The baseline's own share (100 %) without the target's mark."""
    return cell.text.replace(" ✓", "") if isinstance(cell, Cell) and cell.status == "ok" else cell


def rate_blocks(ctx: Context) -> list:
    """Per forward group: each method's rate as a share of the baseline's forward TFLOP/s at the same length."""
    blocks = [Text(
        "Rate against the baseline (forward only): a method's TFLOP/s on the pairs it attends (on visible pairs "
        "where it reports no attended pairs: attention-equivalent for approximate methods) as a percentage of "
        "the baseline's forward TFLOP/s on the same mask, shape and length; the baseline is "
        + (f"{ctx.baseline} (--baseline)" if ctx.baseline else
           f"{DEFAULT_RATE_BASELINE} where it ran, else the exact method fastest at most lengths")
        + f". Issue 9's target is >= {RATE_TARGET:.0%} for the attention part at 32k–64k; cells at or above "
        f"{RATE_TARGET:.0%} are marked ✓.")]
    kernel = ctx.kernel
    forward = kernel[kernel["mode"] == "fwd"]
    tables = 0
    for (group, source), rows in in_group_order(forward):
        where = group + (f" · {source}" if source else "")
        if not (rows["status"] == "ok").any():
            continue  # nothing ran (the slope tables name methods unsupported everywhere)
        baseline = rate_baseline(rows, ctx.baseline)
        if baseline is None:
            blocks.append(Text(f"{where}: no baseline ran ok; no rate shown."))
            continue
        base = rows[(rows["method"] == baseline) & (rows["status"] == "ok")].drop_duplicates("x", keep="last")
        base_rate = dict(zip(base["x"], base["tflops"]))
        frame = rows.drop_duplicates(["label", "x"], keep="last")
        frame = frame[frame.groupby("label")["status"].transform(lambda s: (s != "unsupported").any())]
        frame = frame.assign(share=rate_of(frame) / frame["x"].map(base_rate).astype(float))

        def show(share):
            if not np.isfinite(share):
                return "no baseline"
            text = f"{share:.0%}"
            return Cell(text + " ✓", "ok", f"at or above {RATE_TARGET:.0%}") if share >= RATE_TARGET else text

        header, table = length_table(frame, "share", show)
        on = {label: "attended pairs" if np.isfinite(mine["tflops_attended"]).any() else
              "visible pairs" if mine["is_exact"].all() else "visible pairs (attention-equivalent)"
              for label, mine in frame.groupby("label")}
        header = [header[0], "rate on", *header[1:]]
        base_label = set(base["label"])
        table = [[row[0], "baseline" if row[0] in base_label else on[row[0]],
                  *(plain(cell) if row[0] in base_label else cell for cell in row[1:])] for row in table]
        blocks.append(Table(header, table, f"Forward rate as a share of {baseline}'s forward TFLOP/s, {where}."))
        tables += 1
    if not tables and forward.empty:
        blocks.append(Text("No forward rows: no rate against the baseline."))
    return blocks
