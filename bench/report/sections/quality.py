"""Task quality: per CAB pattern a method x task table with ranks, the metric against length, the needle maps,
and quality against training throughput. Reads each run folder's quality rows (``attnbench.record.quality``)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from attnbench.record.quality import load_quality
from attnbench.record.schema import PATTERNS
from attnbench.report import plots
from attnbench.report.context import Context
from attnbench.report.formatting import fmt
from attnbench.report.maths import pareto_front
from attnbench.report.model import Cell, Section, Table, Text, plot


def quality_rows(ctx: Context) -> pd.DataFrame:
    """Every run's quality rows, labelled like the kernel rows (method, and the run when several are merged)."""
    frames = []
    for run in ctx.runs:
        frame = load_quality(run.path)
        if len(frame):
            frame = frame.assign(run_dir=run.name)
            frames.append(frame)
    if not frames:
        return pd.DataFrame()
    rows = pd.concat(frames, ignore_index=True)
    several = rows["run_dir"].nunique() > 1
    rows["label"] = rows["method"].astype(str) + (" · " + rows["run_dir"] if several else "")
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce").astype(float)
    rows["tokens_per_s"] = pd.to_numeric(rows["tokens_per_s"], errors="coerce").astype(float)
    rows["x"] = pd.to_numeric(rows["seq"], errors="coerce").astype(float)
    rows["reason"] = rows["reason"].fillna("").astype(str)
    return rows


def _direction(rows: pd.DataFrame) -> bool:
    return bool(rows["higher_is_better"].dropna().iloc[0]) if rows["higher_is_better"].notna().any() else True


def rank_table(rows: pd.DataFrame) -> tuple[list[str], list[list], dict]:
    """Method x task for one pattern. A cell: the metric's mean over every (length, seed) run of the task, with
    its rank among the methods that ran every one of them ok (CAB-style: 1 = best); a method with a failed run
    shows the worst status and is not ranked on that task. Last column: the mean rank over the tasks ranked."""
    tasks = sorted(rows["task"].unique())
    labels = sorted(rows["label"].unique())
    planned = rows.groupby("task").apply(lambda r: set(zip(r["x"], r["seed"])), include_groups=False)
    ranks: dict[str, dict[str, int]] = {label: {} for label in labels}
    means: dict[tuple[str, str], float] = {}
    for task in tasks:
        mine = rows[rows["task"] == task]
        complete = {}
        for label, runs in mine.groupby("label"):
            ok = runs[runs["status"] == "ok"]
            if set(zip(ok["x"], ok["seed"])) >= planned[task] and len(ok):
                complete[label] = float(ok["value"].mean())
            if len(ok):
                means[(label, task)] = float(ok["value"].mean())
        sign = 1.0 if _direction(mine) else -1.0
        for label, value in complete.items():  # ties share a rank: 1 + the methods strictly better
            ranks[label][task] = 1 + sum(sign * other > sign * value for other in complete.values())
    header = ["method", *[f"{t} ({rows[rows['task'] == t]['metric'].iloc[0]}{' ↑' if _direction(rows[rows['task'] == t]) else ' ↓'})"
                          for t in tasks], "mean rank"]
    table = []
    for label in labels:
        line = [label]
        for task in tasks:
            runs = rows[(rows["task"] == task) & (rows["label"] == label)]
            if runs.empty:
                line.append("")
                continue
            failed = runs[runs["status"] != "ok"]
            if task in ranks[label]:
                line.append(f"{fmt(means[(label, task)])} (#{ranks[label][task]})")
            elif len(failed):
                status = failed["status"].mode().iloc[0]
                partial = f"{fmt(means[(label, task)])}, " if (label, task) in means else ""
                line.append(Cell(f"{partial}{status} ×{len(failed)}", status, "; ".join(sorted(set(failed["reason"])))[:500]))
            else:
                line.append(fmt(means.get((label, task))))
        mean_rank = np.mean(list(ranks[label].values())) if ranks[label] else np.nan
        line.append(fmt(mean_rank) if ranks[label] else "")
        table.append(line)
    return header, table, ranks


def _length_panels(rows: pd.DataFrame) -> list[plots.QualityPanel]:
    panels = []
    for task, mine in rows.groupby("task"):
        series = []
        for label, runs in mine.groupby("label"):
            ok = runs[runs["status"] == "ok"]
            stats = ok.groupby("x")["value"].agg(["mean", "min", "max"]).sort_index()
            failed_x = sorted(set(runs.loc[runs["status"] != "ok", "x"]) - set(stats.index))
            failed = [(x, runs[(runs["x"] == x) & (runs["status"] != "ok")]["status"].iloc[0]) for x in failed_x]
            series.append(plots.Series(label, stats.index.to_numpy(), stats["mean"].to_numpy(),
                                       stats["min"].to_numpy(), stats["max"].to_numpy(), failed))
        panels.append(plots.QualityPanel(f"{task} · {mine['pattern'].iloc[0]}", mine["metric"].iloc[0], series,
                                         _direction(mine)))
    return panels


def _needle_maps(rows: pd.DataFrame) -> tuple[list, list[str], list[str]] | None:
    needle = rows[(rows["task"] == "niah") & (rows["status"] == "ok") & rows["breakdown"].notna()]
    if needle.empty:
        return None
    cells: dict[str, dict[tuple[str, float], list[float]]] = {}
    depths: set[str] = set()
    for label, x, text in zip(needle["label"], needle["x"], needle["breakdown"]):
        for depth, value in json.loads(text).items():
            depths.add(depth)
            cells.setdefault(label, {}).setdefault((depth, x), []).append(float(value))
    depth_labels = sorted(depths, key=lambda d: float(d.split("=")[-1]))
    lengths = sorted(set(needle["x"]))
    maps = []
    for label in sorted(cells):
        grid = np.full((len(depth_labels), len(lengths)), np.nan)
        for (depth, x), values in cells[label].items():
            grid[depth_labels.index(depth), lengths.index(x)] = float(np.mean(values))
        maps.append((label, grid))
    return maps, depth_labels, [plots.tokens(x) for x in lengths]


def section_quality(ctx: Context) -> Section | None:
    rows = quality_rows(ctx)
    if rows.empty:
        return None
    section = Section("quality", "Task quality")
    trained = rows[rows["kind"] == "train"]
    probes = rows[rows["kind"] == "probe"]
    section.blocks.append(Text(
        "Small models trained from scratch on generated tasks (attnbench train), one per method, task, length and "
        "seed; the metric is measured on held-out or freshly drawn examples that are the same for every method of "
        "a seed. Per CAB pattern: a method × task table, each cell the mean over lengths and seeds, with the "
        "method's rank on the task among those whose every run finished ok (#1 = best); failed runs show their "
        "status (hover for the reason). ↑: higher is better, ↓: lower is better."))
    for pattern in PATTERNS:
        mine = trained[trained["pattern"] == pattern]
        if mine.empty:
            continue
        header, table, _ = rank_table(mine)
        lengths = ", ".join(plots.tokens(x) for x in sorted(set(mine["x"])))
        seeds = mine["seed"].nunique()
        section.blocks.append(Table(header, table, f"{pattern}: lengths {lengths}; {seeds} seed(s)."))
    if len(trained):
        panels = _length_panels(trained)
        for start in range(0, len(panels), 6):
            section.blocks.append(plot(
                f"quality-length-{start}", "task metric against length",
                "Mean over seeds (band: min to max); x: a failed run, with its status.",
                plots.quality_lines, "Task metric against length", panels[start:start + 6],
                plots.Palette(rows["label"])))
    needle = _needle_maps(trained) if len(trained) else None
    if needle:
        maps, depth_labels, length_labels = needle
        section.blocks.append(plot("needle-maps", "needle accuracy by depth and length",
                                   "Exact-match accuracy of the needle's value by insertion depth (rows) and length "
                                   "(columns), mean over seeds.", plots.grid_maps,
                                   "Needle in a haystack: accuracy by depth × length", maps, depth_labels,
                                   length_labels, "exact match"))
    speed = trained[(trained["status"] == "ok") & np.isfinite(trained["tokens_per_s"])]
    if len(speed):
        table = []
        for (task, x), group in speed.groupby(["task", "x"]):
            means = group.groupby("label")[["value", "tokens_per_s"]].mean()
            higher = _direction(group)
            front = pareto_front(-means["tokens_per_s"], means["value"], higher_is_better=higher)
            for (label, row), on in zip(means.iterrows(), front):
                table.append([task, plots.tokens(x), label, fmt(row["value"]), fmt(row["tokens_per_s"]),
                              "yes" if on else ""])
        section.blocks.append(Table(["task", "length", "method", "metric (mean)", "training tokens/s", "on front"],
                                    table, "Quality against training throughput of the task model (the same model "
                                    "for every method): on the front, no other method is both faster and better.",
                                    collapsed=True))
    if len(probes):
        table = []
        for row in probes.sort_values(["task", "x", "label", "seed"]).itertuples():
            shown = fmt(row.value) if row.status == "ok" else Cell(row.status, row.status, row.reason or None)
            breakdown = ""
            if row.status == "ok" and isinstance(row.breakdown, str):
                breakdown = ", ".join(f"{k} {fmt(v)}" for k, v in json.loads(row.breakdown).items())
            table.append([row.task, plots.tokens(row.x), row.label, row.metric, shown, breakdown])
        section.blocks.append(Table(["probe", "length", "method", "metric", "value", "by group"], table,
                                    "Training-free probes of the attention call alone (no model)."))
    return section
