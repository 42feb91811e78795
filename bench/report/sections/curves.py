"""Curves: time, throughput and memory (and bandwidth for decode) against length, one line per method."""
from __future__ import annotations

import numpy as np
import pandas as pd

from attnbench.report import plots
from attnbench.report.context import Context, calibration_of, group_order
from attnbench.report.formatting import fmt
from attnbench.report.model import Section, Table, Text, plot
from attnbench.report.tables import length_table

ROWS_PER_FIGURE = 4  # head shapes per curve figure; more shapes continue in the next figure


def section_curves(ctx: Context) -> Section:
    """Per mask, pattern and mode, one figure with a row per head shape: time, TFLOP/s and peak memory (and
    GB/s for decode) against length, one line per method; each shape's times as a table below."""
    section = Section("curves", "Latency, throughput and memory against sequence length")
    kernel = ctx.kernel
    calibrated = any(calibration_of(run.env) for run in ctx.runs)
    section.blocks.append(Text(
        "Log-log; one line per method; shaded band: p20 to p80 of the repetitions. A case that did not produce a "
        "measurement is an × at the bottom of the panel with its status; methods unsupported at every length of "
        "a shape are named under the figure."
        + (" The dashed line in the throughput panel is the device's measured bf16 matmul peak (figures that mix "
           "devices omit it)." if calibrated else "")))
    by_group = dict(tuple(kernel.groupby("group")))
    figures: dict[str, list[str]] = {}
    for group in group_order(kernel):
        figures.setdefault(by_group[group]["figure"].iloc[0], []).append(group)
    for figure, groups in figures.items():
        for start in range(0, len(groups), ROWS_PER_FIGURE):
            chunk = groups[start:start + ROWS_PER_FIGURE]
            section.blocks.extend(curve_figure(ctx, figure, [(g, by_group[g]) for g in chunk]))
    if kernel.empty:
        section.blocks.append(Text("No single-device kernel rows in these runs."))
    return section


def series_of(mine: pd.DataFrame, label: str, metric: str, spread: tuple[str, str] | None = None) -> plots.Series:
    """One line from the rows of one label, sorted by x: ok rows with a positive metric, and failed rows.

    ``spread``: the (low, high) columns of a band, drawn only where every point has both.
    """
    x = mine["x"].to_numpy(dtype=float)
    status = mine["status"].to_numpy()
    values = mine[metric].to_numpy(dtype=float)
    ok = status == "ok"
    keep = ok & (values > 0)
    low = high = None
    if spread:
        low, high = (mine[column].to_numpy(dtype=float)[keep] for column in spread)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            low = high = None
    failed = [(at, why) for at, why in zip(x[~ok], status[~ok]) if np.isfinite(at)]
    return plots.Series(label, x[keep], values[keep], low, high, failed)


def curve_figure(ctx: Context, figure: str, groups: list[tuple[str, pd.DataFrame]]) -> list:
    """The figure of one mask, pattern and mode (a row per shape group) and a time table per group."""
    rows_of_panels, notes, tables = [], [], []
    for group, rows in groups:
        shape = rows["shape"].iloc[0]
        statuses = rows.groupby("label")["status"].agg(set)
        unsupported = sorted(label for label, s in statuses.items() if s == {"unsupported"})
        labels = sorted(label for label in statuses.index if label not in unsupported)
        if unsupported:
            notes.append(f"{shape}: unsupported at every length: {', '.join(unsupported)}.")
        if not labels:
            continue
        calibrations = {calibration_of(run.env) for run in ctx.runs if run.name in set(rows["run_dir"])}
        peak = next(iter(calibrations)) if len(calibrations) == 1 else None
        reference = (peak[0], f"measured bf16 matmul peak {fmt(peak[0])} TFLOP/s") if peak else None
        by_label = {label: mine.sort_values("x") for label, mine in rows.groupby("label") if label in labels}
        panels = [
            plots.Panel("time per call", "time (ms)",
                        [series_of(m, lb, "ms_median", ("ms_p20", "ms_p80")) for lb, m in by_label.items()]),
            plots.Panel("throughput", "TFLOP/s", [series_of(m, lb, "tflops") for lb, m in by_label.items()],
                        reference),
            plots.Panel("peak memory", "peak memory (MiB)",
                        [series_of(m, lb, "peak_mem_mb") for lb, m in by_label.items()]),
        ]
        if (rows["mode"] == "decode").all():
            panels.append(plots.Panel("bandwidth", "GB/s", [series_of(m, lb, "gbps") for lb, m in by_label.items()]))
        rows_of_panels.append((shape, panels))
        header, table = length_table(rows[rows["label"].isin(labels)], "ms_median", lambda v: fmt(v))
        tables.append(Table(header, table, f"Median time per call (ms), {group}.", collapsed=True))
    if not rows_of_panels:
        return [Text(f"{figure}: every method unsupported. " + " ".join(notes))]
    every = pd.concat([rows for _, rows in groups])
    same_q = (every["seq_q"] == every["seq_kv"]).fillna(False).all()
    xlabel = "sequence length (tokens)" if same_q else "key/value length (tokens)"
    drawing = plot(f"curves-{figure}", f"curves for {figure}", " ".join([figure + ".", *notes]),
                   plots.line_panels, figure, rows_of_panels, ctx.palette, xlabel)
    return [drawing, *tables]
