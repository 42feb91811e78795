"""`attnbench report RUN [RUN ...]`: a report that answers "which method is fastest, leanest and still right?".

Writes ``report.md`` (figures as ``report_files/*.png`` next to it) and a self-contained ``report.html``
(figures embedded as base64 PNG, CSS inline, no external URL) into the first run folder, or into ``--out``.
Several runs merge into one report; lines are labelled by method and, when runs differ, by device or run.

The report is the list ``SECTIONS`` of functions ``section_x(ctx) -> Section | None`` (None: the section does
not apply, e.g. no task-quality rows); adding a section is adding one function to that list. Only measured
values are shown as values: failed cases appear as markers, status words or table entries.
"""
from __future__ import annotations

import argparse
import base64
import html
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from attnbench.report import plots as plots
from attnbench.record.rundir import Run, UsageError, load_runs, merge_runs, parse_args
from attnbench.record.schema import STATUSES

MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd_bwd": 2, "decode": 3}
# worst first: the colour of a capability cell is that of its worst status
SEVERITY = ("wrong", "crashed", "error", "timeout", "oom", "unsupported", "ok")
METRICS = ("ms_median", "ms_p20", "ms_p80", "tflops", "gbps", "peak_mem_mb", "flops", "bytes_moved",
           "sm_clock_mhz", "power_w", "temp_c", "quality", "ms_rank_max", "ms_rank_mean", "imbalance",
           "comm_bytes")
CASE_FIELDS = ("source", "mask", "pattern", "mode", "batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim",
               "dtype", "layout", "world_size", "seed")
KERNEL_COLUMNS = (*CASE_FIELDS, "label", "method", "run_dir", "figure", "group", "shape", "x", "status", "reason",
                  "is_exact", "ms_median", "ms_p20", "ms_p80", "tflops", "gbps", "peak_mem_mb", "flops", "bytes_moved",
                  "peak_fraction")
ROWS_PER_FIGURE = 4  # head shapes per curve figure; more shapes continue in the next figure
LOWER_IS_BETTER = re.compile(r"loss|err|mse|mae|ppl|perplexity|distance", re.IGNORECASE)
NOT_RECORDED = "not recorded"


# ---------------------------------------------------------------------------------------------- report model
@dataclass
class Text:
    """A paragraph of plain text."""

    text: str


@dataclass
class Code:
    """Preformatted text, shown verbatim (e.g. the command of a run)."""

    text: str


@dataclass
class Cell:
    """A table cell; ``status`` colours it, ``title`` is shown on hover (HTML)."""

    text: str
    status: str | None = None
    title: str | None = None


@dataclass
class Table:
    """Rows of cells (str or Cell) under ``header``; ``collapsed`` folds it behind its caption (<details>)."""

    header: list[str]
    rows: list[list]
    caption: str = ""
    collapsed: bool = False


@dataclass
class Plot:
    """A rendered figure; ``name`` is its file stem under report_files/."""

    name: str
    alt: str
    caption: str
    png: bytes


@dataclass
class Section:
    """One report section: ``anchor`` is its id in both reports (and the table of contents)."""

    anchor: str
    title: str
    blocks: list = field(default_factory=list)


@dataclass
class Context:
    """What every section reads.

    ``rows``: merged rows with derived columns (see ``prepare_rows``); ``kernel``: the single-device kernel rows
    (no task-quality, no CP layout) with only ``KERNEL_COLUMNS``, so that the many per-figure selections stay
    cheap; ``baseline``: the --baseline method or None; ``palette``: one line style per label.
    """

    runs: list[Run]
    rows: pd.DataFrame
    kernel: pd.DataFrame
    baseline: str | None
    palette: plots.Palette


# ---------------------------------------------------------------------------------------------- pure math
def efficiency_length(seq, t_method, t_baseline) -> float | None:
    """Length (tokens) at which the method's curve first crosses the baseline's from above, else None.

    ``seq``, ``t_method``, ``t_baseline``: equal-length sequences (time in any unit, or memory); entries that are
    NaN or not positive were not measured and are skipped. The curves are interpolated piecewise-linearly in
    log(value) against log(length) between measured lengths, so the crossing lies between the two measured
    lengths that bracket the change of sign of log(t_method / t_baseline). Returns None when the method is not
    above the baseline at some length and at or below it at a longer one ("never within the measured range").
    """
    seq, method, base = (np.asarray(a, dtype=float) for a in (seq, t_method, t_baseline))
    valid = np.isfinite(seq) & np.isfinite(method) & np.isfinite(base) & (seq > 0) & (method > 0) & (base > 0)
    order = np.argsort(seq[valid])
    log_seq = np.log(seq[valid][order])
    gap = np.log(method[valid][order]) - np.log(base[valid][order])
    for i in range(len(gap) - 1):
        if gap[i] > 0 >= gap[i + 1]:
            share = gap[i] / (gap[i] - gap[i + 1])
            return float(np.exp(log_seq[i] + share * (log_seq[i + 1] - log_seq[i])))
    return None


def describe_crossing(seq, t_method, t_baseline, better: str, worse: str) -> str:
    """Words for the efficiency length: "6,144 tokens", or "never within the measured range (...)"."""
    seq, method, base = (np.asarray(a, dtype=float) for a in (seq, t_method, t_baseline))
    valid = np.isfinite(method) & np.isfinite(base) & (method > 0) & (base > 0)
    if valid.sum() < 2:
        return "fewer than 2 lengths measured for both"
    crossing = efficiency_length(seq, method, base)
    if crossing is not None:
        return f"{crossing:,.0f} tokens"
    gap = np.log(method[valid]) - np.log(base[valid])
    if (gap <= 0).all():
        return f"never within the measured range ({better} at every measured length)"
    if (gap > 0).all():
        return f"never within the measured range ({worse} at every measured length)"
    return f"never within the measured range ({better} at short lengths only)"


def pareto_front(x, y, higher_is_better: bool) -> np.ndarray:
    """Boolean mask of points not dominated: no other point is both faster (lower x) and better in y."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    y = y if higher_is_better else -y
    order = np.lexsort((-y, x))
    front = np.zeros(len(x), dtype=bool)
    best = -np.inf
    for i in order:
        if y[i] > best:
            front[i] = True
            best = y[i]
    return front


# ---------------------------------------------------------------------------------------------- preparation
def calibration_of(env: dict) -> tuple[float, float] | None:
    """(bf16 matmul TFLOP/s, copy TB/s) from env.json, or None when not measured."""
    calibration = env.get("calibration") or {}
    if not isinstance(calibration, dict):
        return None
    try:
        peak, bandwidth = float(calibration["matmul_bf16_tflops"]), float(calibration["copy_tbps"])
    except (KeyError, TypeError, ValueError):
        return None
    return (peak, bandwidth) if peak > 0 and bandwidth > 0 else None


def prepare_rows(runs: list[Run]) -> pd.DataFrame:
    """Merged rows plus derived columns.

    ``label`` (method, and source when merged), ``is_exact``, ``kind`` (kernel, cp or task), ``shape`` (see
    ``shape_labels``),
    ``figure`` (mask · pattern · mode: one curve figure), ``group`` (figure · shape: one row of it, one table,
    one efficiency-length comparison), ``x`` (key/value length, tokens), ``peak_fraction``
    (TFLOP/s over the run's measured bf16 matmul peak), metric columns as float64 with NaN when not measured.
    """
    rows = merge_runs(runs)
    for column in METRICS:
        if column in rows:
            rows[column] = pd.to_numeric(rows[column], errors="coerce").astype("Float64").to_numpy(
                dtype=float, na_value=np.nan)
    for column in ("method", "mask", "pattern", "mode", "dtype", "family", "status"):
        rows[column] = rows[column].fillna(NOT_RECORDED).astype(str)
    rows["reason"] = rows["reason"].fillna("").astype(str)
    rows["layout"] = rows["layout"].fillna("single").astype(str)
    rows["label"] = np.where(rows["source"] == "", rows["method"], rows["method"] + " · " + rows["source"])
    rows["is_exact"] = rows["exact"].fillna(rows["family"] == "exact").astype(bool)
    task = rows["task"].notna() if "task" in rows else pd.Series(False, index=rows.index)
    world = rows["world_size"].fillna(1)
    cp = (rows["layout"] != "single") | (world > 1)
    rows["kind"] = np.where(task, "task", np.where(cp, "cp", "kernel"))
    rows["x"] = rows["seq_kv"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)

    def text(column):
        return rows[column].astype("string").fillna("?").astype(str)

    rows["shape"] = shape_labels(rows, text)
    rows["figure"] = rows["mask"] + " · " + rows["pattern"] + " · " + rows["mode"]
    rows["group"] = rows["figure"] + " · " + rows["shape"]
    peaks = {run.name: (calibration_of(run.env) or (np.nan, np.nan))[0] for run in runs}
    rows["peak_fraction"] = rows["tflops"] / rows["run_dir"].map(peaks).astype(float)
    return rows


def shape_labels(rows: pd.DataFrame, text: Callable[[str], pd.Series]) -> pd.Series:
    """The head shape of each row, as it names one curve (one row of a figure).

    Heads, head dim and dtype always; the batch as "b4" when it is constant along the curve, or the tokens per
    call ("b×seq_q = 16,384") when the sweep scales the batch against the length (constant-token sweeps), or
    "batch varies with length". When one method has several batches (or several query lengths) at the same
    key/value length, the batch (or "seq_q N" / "seq_q = seq_kv") becomes part of the shape so that each curve
    keeps one point per length.
    """
    base = "h" + text("heads_q") + "/" + text("heads_kv") + " · d" + text("head_dim") + " · " + rows["dtype"]
    key = rows["mask"] + "|" + rows["pattern"] + "|" + rows["mode"] + "|" + rows["kind"] + "|" + base
    per_length = rows.groupby([key, rows["label"], text("seq_kv"), text("seq_q")])["batch"].transform("nunique")
    batch_split = key.isin(set(key[per_length > 1]))
    batches = rows.groupby(key)["batch"].transform("nunique")
    tokens = rows["batch"].astype("Float64") * rows["seq_q"].astype("Float64")
    constant_tokens = tokens.groupby(key).transform("nunique") == 1
    token_text = tokens.map(lambda t: "?" if pd.isna(t) else f"{t:,.0f}", na_action=None)
    shape = pd.Series(np.where(
        batch_split | (batches <= 1), "b" + text("batch") + " · " + base,
        np.where(constant_tokens, base + " · b×seq_q = " + token_text, base + " · batch varies with length")),
        index=rows.index)
    key = key + "|" + shape
    per_length = rows.groupby([key, rows["label"], text("seq_kv")])["seq_q"].transform("nunique")
    query_split = key.isin(set(key[per_length > 1]))
    query = np.where(rows["seq_q"] == rows["seq_kv"], "seq_q = seq_kv", "seq_q " + text("seq_q"))
    return shape.where(~query_split, shape + " · " + pd.Series(query, index=rows.index))


def group_order(rows: pd.DataFrame) -> list[str]:
    """Figure groups sorted by mask, pattern, mode (fwd, bwd, fwd_bwd, decode), shape."""
    keys = rows[["group", "mask", "pattern", "mode", "shape"]].drop_duplicates("group")
    keys = keys.assign(mode_rank=keys["mode"].map(MODE_ORDER).fillna(9))
    return keys.sort_values(["mask", "pattern", "mode_rank", "shape"])["group"].tolist()


def in_group_order(rows: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """The rows split by (figure group, source), in ``group_order`` and then by source."""
    rank = {group: i for i, group in enumerate(group_order(rows))}
    return sorted(rows.groupby(["group", "source"]), key=lambda item: (rank[item[0][0]], item[0][1]))


def with_baseline(kernel: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """Kernel rows with ``baseline_method``, ``baseline_ms`` and ``speedup`` (baseline time / own time).

    Baseline per case (same source and key fields but the method): ``baseline`` when given, else the fastest
    exact method with status ok. Cases without such a row get NaN.
    """
    frame = kernel.copy()
    frame["case_key"] = frame.groupby(list(CASE_FIELDS), dropna=False, sort=False).ngroup()
    ok = frame[(frame["status"] == "ok") & frame["ms_median"].notna()]
    candidates = ok[ok["method"] == baseline] if baseline else ok[ok["is_exact"]]
    best = candidates.sort_values("ms_median").drop_duplicates("case_key")
    lookup = best.set_index("case_key")
    frame["baseline_method"] = frame["case_key"].map(lookup["method"])
    frame["baseline_ms"] = frame["case_key"].map(lookup["ms_median"]).astype(float)
    frame["speedup"] = np.where(frame["status"] == "ok", frame["baseline_ms"] / frame["ms_median"], np.nan)
    return frame


def curve_baseline(group_rows: pd.DataFrame, baseline: str | None) -> str | None:
    """The one baseline curve of a figure group: ``baseline``, else the exact method fastest at most lengths
    (ties: fastest at the longest such length)."""
    ok = group_rows[(group_rows["status"] == "ok") & group_rows["ms_median"].notna()]
    if baseline:
        return baseline if (ok["method"] == baseline).any() else None
    exact = ok[ok["is_exact"]]
    if exact.empty:
        return None
    winners = exact.sort_values("ms_median").drop_duplicates("x")
    wins: dict[str, tuple[int, float]] = {}
    for method, x in zip(winners["method"], winners["x"]):
        count, longest = wins.get(method, (0, 0.0))
        wins[method] = (count + 1, max(longest, x))
    return max(wins, key=wins.get)


# ---------------------------------------------------------------------------------------------- formatting
def fmt(value, digits: int = 3) -> str:
    """A measured number in `digits` significant digits; empty for not measured."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value is pd.NA:
        return ""
    value = float(value)
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def shown(value) -> str:
    """An env.json value for display; missing or empty is "not recorded"."""
    if value is None or value == "" or value == [] or value == {}:
        return NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "plot"


def status_cell(row) -> Cell:
    return Cell(row["status"], row["status"], row["reason"] or None)


def plot(name: str, alt: str, caption: str, builder: Callable[..., Figure], *args, **kwargs) -> Plot:
    """Render ``builder(*args, **kwargs)`` (a figure of bench.plots) to a Plot."""
    return Plot(slug(name), alt, caption, plots.to_png(builder(*args, **kwargs)))


def length_sort(values) -> list:
    return sorted(v for v in set(values) if pd.notna(v))


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


# ---------------------------------------------------------------------------------------------- sections
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


MASK_PICTURE_PIXELS = 128


def section_masks(ctx: Context) -> Section | None:
    """What each mask looks like, at the largest shape it was measured at (block-averaged pictures, exact
    fractions of visible pairs per pixel), so a reader sees the pattern behind every figure."""
    from attnbench import masks

    kernel = ctx.kernel
    if kernel.empty:
        return None
    tiles, missing = [], []
    for label, rows in kernel.groupby("mask", sort=True):
        largest = rows.assign(area=rows["seq_q"].astype(float) * rows["seq_kv"].astype(float)).sort_values(
            "area").iloc[-1]
        seq_q, seq_kv = int(largest["seq_q"]), int(largest["seq_kv"])
        try:
            bound = masks.make_mask(label).bind(seq_q, seq_kv)
            image = masks.picture.mask_image(bound, MASK_PICTURE_PIXELS).numpy()
            density = bound.visible_pairs() / float(seq_q * seq_kv)
        except Exception as exc:  # noqa: BLE001 - a mask this install cannot rebuild is named, not drawn
            missing.append(f"{label} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            continue
        tiles.append(plots.Tile(label, image, f"{plots.tokens(seq_q)} × {plots.tokens(seq_kv)}, "
                                              f"density {density:.2%}"))
    section = Section("masks", "Masks")
    section.blocks.append(Text(
        "Each mask at the largest shape it was measured at: query rows down, key columns across; a pixel's "
        "shade is the exact fraction of its pairs that are visible."))
    if tiles:
        section.blocks.append(plot("masks", "Pictures of the masks in this report",
                                   "The masks of this report.", plots.mask_gallery, "Masks", tiles))
    if missing:
        section.blocks.append(Text("Not drawn (this install cannot rebuild them): " + "; ".join(missing) + "."))
    return section


def section_capability(ctx: Context) -> Section:
    """Method × (mask · pattern [· layout]) matrix of statuses; reasons on hover and as numbered footnotes."""
    section = Section("capability", "Capability matrix")
    rows = ctx.rows[ctx.rows["kind"] != "task"]
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
            section.blocks.extend(_curve_figure(ctx, figure, [(g, by_group[g]) for g in chunk]))
    if kernel.empty:
        section.blocks.append(Text("No single-device kernel rows in these runs."))
    return section


def _series(mine: pd.DataFrame, label: str, metric: str, spread: tuple[str, str] | None = None) -> plots.Series:
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


def _curve_figure(ctx: Context, figure: str, groups: list[tuple[str, pd.DataFrame]]) -> list:
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
                        [_series(m, lb, "ms_median", ("ms_p20", "ms_p80")) for lb, m in by_label.items()]),
            plots.Panel("throughput", "TFLOP/s", [_series(m, lb, "tflops") for lb, m in by_label.items()], reference),
            plots.Panel("peak memory", "peak memory (MiB)",
                        [_series(m, lb, "peak_mem_mb") for lb, m in by_label.items()]),
        ]
        if (rows["mode"] == "decode").all():
            panels.append(plots.Panel("bandwidth", "GB/s", [_series(m, lb, "gbps") for lb, m in by_label.items()]))
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


def section_peak(ctx: Context) -> Section:
    """Throughput as a fraction of the measured peak, and a roofline per calibrated device."""
    section = Section("peak", "Fraction of peak and roofline")
    kernel = ctx.kernel
    for run in ctx.runs:
        calibration = calibration_of(run.env)
        name = f"{run.device} (run {run.name})"
        if calibration is None:
            section.blocks.append(Text(
                f"{name}: no calibration recorded for this device; fraction of peak and roofline are not shown."))
            continue
        peak, bandwidth = calibration
        measured_at = shown((run.env.get("calibration") or {}).get("measured_at"))
        section.blocks.append(Text(
            f"{name}: measured bf16 matmul peak {fmt(peak)} TFLOP/s, copy bandwidth {fmt(bandwidth)} TB/s "
            f"(measured {measured_at}); ridge point {fmt(peak / bandwidth)} FLOP/byte."))
        ok = kernel[(kernel["run_dir"] == run.name) & (kernel["status"] == "ok") & (kernel["tflops"] > 0)]
        roof = ok[(ok["flops"] > 0) & (ok["bytes_moved"] > 0)]
        panels = []
        for mode in sorted(roof["mode"].unique(), key=lambda m: MODE_ORDER.get(m, 9)):
            in_mode = roof[roof["mode"] == mode]
            points = [plots.Points(label, (r["flops"] / r["bytes_moved"]).to_numpy(), r["tflops"].to_numpy())
                      for label, r in in_mode.groupby("label")]
            panels.append((mode, points))
        if panels:
            section.blocks.append(plot(
                f"roofline-{run.name}", f"roofline of {name}",
                "Each point is one measured case; the line is min(peak, intensity × bandwidth).",
                plots.roofline, f"Roofline: {run.device}", panels, ctx.palette, peak, bandwidth))
        if len(ok):
            table = []
            for (label, mode), r in ok.groupby(["label", "mode"]):
                best = r.loc[r["peak_fraction"].idxmax()]
                above = ((r["peak_fraction"] > 1) & r["is_exact"]).sum()
                check = Cell(f"{above} cases above the peak", "wrong") if above else \
                    ("" if r["is_exact"].all() else "approximate: attention-equivalent rate")
                table.append([label, mode, fmt(r["peak_fraction"].median(), 2), fmt(best["peak_fraction"], 2),
                              f"{best['mask']} at {plots.tokens(best['x'])}", check])
            section.blocks.append(Table(["method", "mode", "median fraction", "best fraction", "best at", "check"],
                                        table, f"Achieved TFLOP/s over the measured peak, {name}. An exact method "
                                        "above 1 means a wrong FLOP count or timing; check those rows."))
    return section


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


def section_quality(ctx: Context) -> Section | None:
    """Task quality against time, with the Pareto front; only when task-quality rows carry a quality."""
    rows = ctx.rows[ctx.rows["kind"] == "task"]
    if rows.empty or "quality" not in rows or rows["quality"].isna().all():
        return None
    section = Section("quality", "Quality against speed")
    metric = rows["quality_metric"].astype("string").fillna("quality").astype(str) if "quality_metric" in rows \
        else pd.Series("quality", index=rows.index)
    rows = rows.assign(task=rows["task"].astype(str), metric=metric)
    panels, table = [], []
    for (task, metric_name), r in rows.groupby(["task", "metric"]):
        higher = not LOWER_IS_BETTER.search(metric_name)
        measured = r[(r["status"] == "ok") & r["quality"].notna() & (r["ms_median"] > 0)]
        front = pareto_front(measured["ms_median"], measured["quality"], higher)
        points = [plots.Points(label, m["ms_median"].to_numpy(), m["quality"].to_numpy())
                  for label, m in measured.groupby("label")]
        front_xy = measured[front].sort_values("ms_median")[["ms_median", "quality"]].to_numpy()
        if points:
            panels.append((task, f"{metric_name} ({'higher' if higher else 'lower'} is better)", points, front_xy))
        on_front = set(measured.index[front])
        for index, row in r.sort_values(["label"]).iterrows():
            table.append([task, metric_name, row["label"], status_cell(row), fmt(row["quality"], 4),
                          fmt(row["ms_median"]) or "not measured", "yes" if index in on_front else ""])
    for start in range(0, len(panels), 3):
        chunk = panels[start:start + 3]
        section.blocks.append(plot(f"quality-{start}", "quality against speed",
                                   "Dashed: the Pareto front (nothing is faster and better).",
                                   plots.pareto, "Quality against time per call", chunk, ctx.palette))
    section.blocks.append(Table(["task", "metric", "method", "status", "quality", "time (ms)", "on front"],
                                table, "Task quality per method."))
    return section


def section_cp_scaling(ctx: Context) -> Section | None:
    """Context-parallel layouts: step time against world size; only when CP rows exist."""
    rows = ctx.rows[ctx.rows["kind"] == "cp"]
    if rows.empty:
        return None
    section = Section("cp-scaling", "Context-parallel scaling")
    step = rows["ms_rank_max"] if "ms_rank_max" in rows else rows["ms_median"]
    rows = rows.assign(step_ms=step.fillna(rows["ms_median"]), line=rows["label"] + " · " + rows["layout"])
    ok_single = ctx.kernel[(ctx.kernel["status"] == "ok") & (ctx.kernel["ms_median"] > 0)]
    one_gpu = {(group, label, x): ms for group, label, x, ms in zip(ok_single["group"], ok_single["label"],
                                                                   ok_single["x"], ok_single["ms_median"])}
    section.blocks.append(Text(
        "Step time is the slowest rank's time (ms_rank_max) when recorded, else the median. Dotted: ideal scaling "
        "from the same method measured on one GPU at the same length (its time / world size), when measured. "
        "Speed-up is over that one-GPU time; efficiency = speed-up / world size."))
    ideal_name = "{} · ideal from 1 GPU"
    line_palette = plots.Palette([*rows["line"], *[ideal_name.format(label) for label in rows["label"]]])
    table = []
    for group in group_order(rows):
        in_group = rows[rows["group"] == group]
        panels = []
        for x in length_sort(in_group["x"])[-3:]:
            at = in_group[in_group["x"] == x].assign(x=in_group["world_size"].astype(float))
            series = [_series(mine.sort_values("x"), line, "step_ms") for line, mine in at.groupby("line")]
            worlds = np.array([1.0, *length_sort(at["x"])])
            for label in sorted(set(at["label"])):
                if (group, label, x) in one_gpu:
                    series.append(plots.Series(ideal_name.format(label), worlds, one_gpu[(group, label, x)] / worlds,
                                               ideal=True))
            panels.append(plots.Panel(f"length {plots.tokens(x)}", "step time (ms)", series))
        section.blocks.append(plot(f"cp-{group}", f"CP scaling for {group}", "", plots.line_panels,
                                   f"CP scaling: {group}", [("", panels)], line_palette, "world size (GPUs)",
                                   x_tokens=False))
        for _, row in in_group.sort_values(["label", "layout", "x", "world_size"]).iterrows():
            single_ms = one_gpu.get((group, row["label"], row["x"]), np.nan)
            speedup = single_ms / row["step_ms"] if row["step_ms"] > 0 else np.nan
            world = row["world_size"]
            table.append([row["label"], row["layout"], plots.tokens(row["x"]), shown(world), status_cell(row),
                          fmt(row["step_ms"]), fmt(row.get("ms_rank_mean", np.nan)), fmt(row.get("imbalance", np.nan)),
                          fmt(row.get("comm_bytes", np.nan)), fmt(speedup),
                          fmt(speedup / world) if pd.notna(world) and world else ""])
    section.blocks.append(Table(["method", "layout", "length", "world size", "status", "step (ms)", "mean rank (ms)",
                                 "imbalance", "bytes communicated", "speed-up", "efficiency"], table,
                                "Per-rank timing of context-parallel cases.", collapsed=len(table) > 20))
    return section


def section_environment(ctx: Context) -> Section:
    """What produced each run: command, hardware, clocks, calibration, software versions, configuration."""
    section = Section("environment", "Environment and command")
    for run in ctx.runs:
        env = run.env
        gpus = [g for g in env.get("gpus") or [] if isinstance(g, dict)]
        calibration = env.get("calibration") if isinstance(env.get("calibration"), dict) else None
        git = shown(env.get("git_sha"))
        if env.get("git_dirty"):
            git += " (uncommitted changes)"
        clocks = []
        for column, unit in (("sm_clock_mhz", "MHz SM clock"), ("power_w", "W"), ("temp_c", "°C")):
            values = pd.to_numeric(run.rows[column], errors="coerce").dropna()
            if len(values):
                clocks.append(f"{fmt(values.median())} {unit}")
        fields = [
            ("run", run.name), ("device", run.device), ("host", shown(env.get("host"))),
            ("started", shown(env.get("started_at"))), ("finished", shown(env.get("finished_at"))),
            ("driver", shown(env.get("driver"))), ("CUDA", shown(env.get("cuda"))), ("cuDNN", shown(env.get("cudnn"))),
            ("torch", shown(env.get("torch"))), ("triton", shown(env.get("triton"))),
            ("python", shown(env.get("python"))), ("git SHA", git),
            ("calibration", f"bf16 matmul {fmt(calibration.get('matmul_bf16_tflops'))} TFLOP/s, copy "
                            f"{fmt(calibration.get('copy_tbps'))} TB/s, "
                            f"measured {shown(calibration.get('measured_at'))}" if calibration else NOT_RECORDED),
            ("clocks while timing (median)", ", ".join(clocks) or NOT_RECORDED),
        ]
        section.blocks.append(Table(["field", run.name], [[k, v] for k, v in fields], f"Environment of {run.name}."))
        if gpus:
            section.blocks.append(Table(
                ["GPU", "name", "memory (MiB)", "max SM clock (MHz)", "max memory clock (MHz)", "power limit (W)"],
                [[str(i), shown(g.get("name")), shown(g.get("memory_mb")), shown(g.get("sm_clock_max_mhz")),
                  shown(g.get("mem_clock_max_mhz")), shown(g.get("power_limit_w"))] for i, g in enumerate(gpus)],
                f"GPUs of {run.name}."))
        else:
            section.blocks.append(Text(f"GPUs of {run.name}: {NOT_RECORDED}."))
        section.blocks.append(Text(f"Command that produced {run.name}:"))
        section.blocks.append(Code(shown(env.get("command"))))
        if run.config:
            section.blocks.append(Table(["key", "value"], [[k, shown(v)] for k, v in run.config.items()],
                                        f"Resolved configuration of {run.name} (config.yaml).", collapsed=True))
        else:
            section.blocks.append(Text(f"Configuration of {run.name}: {NOT_RECORDED}."))
        packages = env.get("packages") if isinstance(env.get("packages"), dict) else {}
        if packages:
            section.blocks.append(Table(["package", "version"], [[k, shown(v)] for k, v in sorted(packages.items())],
                                        f"Packages of {run.name}.", collapsed=True))
    return section


SECTIONS = (section_overview, section_masks, section_capability, section_curves, section_peak, section_speedup,
            section_efficiency_length, section_quality, section_cp_scaling, section_environment)


# ---------------------------------------------------------------------------------------------- rendering
def build_report(runs: list[Run], baseline: str | None = None) -> list[Section]:
    """Every section that applies to these runs, in report order."""
    rows = prepare_rows(runs)
    kernel = rows.loc[rows["kind"] == "kernel", list(KERNEL_COLUMNS)]
    # object columns: element access on Arrow-backed strings is slow in the per-figure loops
    kernel = kernel.astype({c: object for c in kernel.columns if pd.api.types.is_string_dtype(kernel[c])})
    ctx = Context(runs, rows, kernel, baseline, plots.Palette(rows["label"]))
    return [s for s in (section(ctx) for section in SECTIONS) if s is not None]


def _md_cell(cell) -> str:
    text = cell.text if isinstance(cell, Cell) else str(cell)
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section], files_dir: str) -> str:
    """Markdown with figures referenced as ``files_dir/<name>.png``."""
    out = [f"# {title}", "", *[f"- [{s.title}](#{s.anchor})" for s in sections], ""]
    for section in sections:
        out += [f'<a id="{section.anchor}"></a>', f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                out += [block.text, ""]
            elif isinstance(block, Code):
                out += ["```", block.text, "```", ""]
            elif isinstance(block, Plot):
                out += [f"![{block.alt}]({files_dir}/{block.name}.png)", ""]
                if block.caption:
                    out += [f"*{block.caption}*", ""]
            elif isinstance(block, Table):
                if block.collapsed:
                    out += [f"<details><summary>{block.caption}</summary>", ""]
                elif block.caption:
                    out += [f"*{block.caption}*", ""]
                out.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                out.append("|" + "---|" * len(block.header))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                out += ["", "</details>", ""] if block.collapsed else [""]
    return "\n".join(out)


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #1a1a1a; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.2rem; }
nav#toc ol { columns: 2; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: 12.5px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; position: sticky; top: 0; }
caption { caption-side: top; text-align: left; font-style: italic; padding: 2px 0; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #444; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; white-space: pre-wrap; }
details { margin: .4rem 0; } summary { cursor: pointer; color: #234; }
td[title] { cursor: help; }
""" + "".join(f".st-{status} {{ background: {color}; }}\n" for status, color in plots.STATUS_COLORS.items()) + """
@media print { nav#toc { display: none; } figure { page-break-inside: avoid; } }
"""

SCRIPT_HEAD = """window.addEventListener('error', function (e) {
  var b = document.body; if (!b) return;
  b.setAttribute('data-js-errors', String(Number(b.getAttribute('data-js-errors') || 0) + 1));
});"""
SCRIPT_LOAD = """window.addEventListener('load', function () {
  var plots = document.querySelectorAll('img.plot'), drawn = 0;
  for (var i = 0; i < plots.length; i++) { if (plots[i].complete && plots[i].naturalWidth > 0) drawn++; }
  document.body.setAttribute('data-plots', String(drawn));
  document.body.setAttribute('data-plots-expected', String(plots.length));
});"""


def _html_cell(cell, tag: str = "td") -> str:
    if not isinstance(cell, Cell):
        return f"<{tag}>{html.escape(str(cell))}</{tag}>"
    attrs = f' class="st-{cell.status}"' if cell.status in plots.STATUS_COLORS else ""
    if cell.title:
        attrs += f' title="{html.escape(cell.title, quote=True)}"'
    return f"<{tag}{attrs}>{html.escape(cell.text)}</{tag}>"


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def render_html(title: str, sections: list[Section]) -> str:
    """One self-contained page: CSS inline, figures as data: URIs, nothing fetched from anywhere."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{CSS}</style>", f"<script>{SCRIPT_HEAD}</script>", "</head><body>",
           f"<h1>{html.escape(title)}</h1>", '<nav id="toc"><h2>Contents</h2><ol>',
           *[f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections], "</ol></nav>"]
    for section in sections:
        out.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Text):
                out.append(f"<p>{html.escape(block.text)}</p>")
            elif isinstance(block, Code):
                out.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
            elif isinstance(block, Plot):
                width, height = _png_size(block.png)
                data = base64.b64encode(block.png).decode("ascii")
                out.append(f'<figure><img class="plot" width="{width}" height="{height}" '
                           f'alt="{html.escape(block.alt, quote=True)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
            elif isinstance(block, Table):
                table = ["<table>"]
                if block.caption and not block.collapsed:
                    table.append(f"<caption>{html.escape(block.caption)}</caption>")
                table.append("<thead><tr>" + "".join(_html_cell(h, "th") for h in block.header) + "</tr></thead>")
                table.append("<tbody>" + "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>"
                                                 for row in block.rows) + "</tbody></table>")
                if block.collapsed:
                    table = [f"<details><summary>{html.escape(block.caption)}</summary>", *table, "</details>"]
                out.append("".join(table))
        out.append("</section>")
    out += [f"<script>{SCRIPT_LOAD}</script>", "</body></html>"]
    return "\n".join(out)


def write_report(sections: list[Section], out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write report.md, report_files/*.png and report.html into ``out_dir``; returns the two report paths."""
    files = out_dir / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    for stale in files.glob("*.png"):
        stale.unlink()
    used: set[str] = set()
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Plot):
                name, n = block.name, 1
                while name in used:
                    n += 1
                    name = f"{block.name}-{n}"
                block.name = name
                used.add(name)
                (files / f"{name}.png").write_bytes(block.png)
    markdown, page = out_dir / "report.md", out_dir / "report.html"
    markdown.write_text(render_markdown(title, sections, files.name))
    page.write_text(render_html(title, sections))
    return markdown, page


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="attnbench report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder, or run id under --results-dir")
    parser.add_argument("--out", type=Path, help="folder for the report (default: the first run folder)")
    parser.add_argument("--baseline", metavar="METHOD",
                        help="method to compare against (default: the fastest exact method per case)")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="where run ids are looked up")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    try:
        runs = load_runs(args.runs, args.results_dir)
        if not any(len(run.rows) for run in runs):
            raise UsageError(f"RUN: no rows in {', '.join(str(run.path) for run in runs)}")
        methods = sorted(set().union(*(set(run.rows["method"].dropna()) for run in runs)))
        if args.baseline and args.baseline not in methods:
            raise UsageError(f"--baseline {args.baseline!r}: no such method in these runs "
                             f"(methods: {', '.join(methods)})")
        sections = build_report(runs, args.baseline)
        title = "attnbench report: " + ", ".join(run.name for run in runs)
        markdown, page = write_report(sections, args.out or runs[0].path, title)
    except UsageError as exc:
        print(f"attnbench report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {markdown}\nwrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
