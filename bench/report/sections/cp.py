"""Context-parallel layouts: strong and weak scaling per layout, per-rank imbalance, bytes against time, and a
layout × mask capability matrix, with the numbers in a table.

Definitions (also written into the report):

- strong scaling: the same case (same length) on W devices against one device. ``speedup = t1 / tW`` where t1 is
  the row's ``single_ms`` (the runner's one-device row of the same case) or else the one-device ok row of the
  same case in the same run; ``efficiency = speedup / W``. Ideal: speedup = W, efficiency = 1. A speed-up
  above W is impossible (the one-device time or the CP time is wrong) and is flagged in red.
- weak scaling: the tokens per device ``T = seq_kv / W`` held constant. The reference is the one-device row
  at length T (or the layout's own row at world size 1). ``time ratio = t1(T) / tW(W·T)`` is 1 only when the
  work per device is constant, which holds for methods linear in length but not for attention: full
  attention on W·T tokens is W² times the work of T tokens, W times per device, so even a perfect layout has
  a time ratio of 1/W. The work-normalised ``weak efficiency = (flops_W / flops_1) · t1 / (W · tW)`` (the
  per-device throughput at W over that at 1) is 1 for a perfect layout whatever the cost model; it is the one
  plotted against the ideal line, and equals the time ratio for linear-cost methods.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from attnbench.report import plots
from attnbench.report.context import Context
from attnbench.report.formatting import fmt
from attnbench.report.model import Cell, Section, Table, Text, plot, status_cell
from attnbench.report.sections.capability import SEVERITY

CP_METRICS = ("ms_rank_max", "ms_rank_mean", "imbalance", "comm_bytes", "comm_gbps", "single_ms", "speedup",
              "efficiency")
# the fields that name one case apart from its layout and world size
SAME_CASE = ("run_dir", "source", "method", "mask", "pattern", "mode", "batch", "heads_q", "heads_kv", "seq_q",
             "seq_kv", "head_dim", "dtype")
ROWS_PER_FIGURE = 4
BARS_PER_FIGURE = 4
TOLERANCE = 1e-6  # relative: a speed-up this far above the world size is rounding, not impossible
RECORDED_DISAGREES = 0.01  # relative difference between the recorded and the recomputed speed-up worth a flag


def numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """A column as float64 with NaN for missing (the column itself may be absent)."""
    if column not in frame:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[column], errors="coerce").astype(float)


def shape_of(frame: pd.DataFrame) -> pd.Series:
    """b1 · h16/16 · d128 · bf16: the head shape of a row (without the length)."""
    def text(column):
        return frame[column].astype("string").fillna("?").astype(str)
    return "b" + text("batch") + " · h" + text("heads_q") + "/" + text("heads_kv") + " · d" + text("head_dim") \
        + " · " + frame["dtype"].astype(str)


def rank_times(value) -> list[float] | None:
    """The ';'-separated per-rank times of ``rank_ms`` as floats, or None when absent or unreadable."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    try:
        times = [float(part) for part in str(value).split(";") if part.strip()]
    except ValueError:
        return None
    return times if times and all(np.isfinite(times)) else None


def cp_frame(ctx: Context) -> pd.DataFrame:
    """The CP rows with the recomputed scaling columns.

    ``world`` (float), ``tag`` (layout, plus the method when the CP rows hold several), ``case_shape``,
    ``one_ms`` (t1 of strong scaling), ``speedup_calc``, ``efficiency_calc``, ``impossible`` (speed-up above
    the world size), ``disagrees`` (the recorded speed-up differs from the recomputed one by more than 1 %).
    """
    rows = ctx.rows[ctx.rows["kind"] == "cp"].copy()
    for column in CP_METRICS:
        rows[column] = numeric(rows, column)
    rows["world"] = numeric(rows, "world_size").fillna(1.0)
    several_methods = rows["method"].nunique() > 1
    rows["tag"] = rows["layout"] + (" · " + rows["method"] if several_methods else "")
    rows["case_shape"] = shape_of(rows)
    rows["one_ms"] = rows["single_ms"].where(rows["single_ms"] > 0)
    singles = ctx.rows[(ctx.rows["kind"] == "kernel") & (ctx.rows["status"] == "ok") & (ctx.rows["ms_median"] > 0)]
    if len(rows) and len(singles):
        lookup = singles.drop_duplicates(list(SAME_CASE)).set_index(list(SAME_CASE))["ms_median"]
        keys = pd.MultiIndex.from_frame(rows[list(SAME_CASE)])
        found = pd.Series(lookup.reindex(keys).to_numpy(dtype=float), index=rows.index)
        rows["one_ms"] = rows["one_ms"].fillna(found)
    ok = (rows["status"] == "ok") & (rows["ms_median"] > 0)
    rows["speedup_calc"] = np.where(ok, rows["one_ms"] / rows["ms_median"], np.nan)
    rows["efficiency_calc"] = rows["speedup_calc"] / rows["world"]
    rows["impossible"] = rows["speedup_calc"] > rows["world"] * (1 + TOLERANCE)
    recorded = rows["speedup"]
    rows["disagrees"] = recorded.notna() & rows["speedup_calc"].notna() & (
        (recorded - rows["speedup_calc"]).abs() > RECORDED_DISAGREES * rows["speedup_calc"])
    recorded_eff = rows["efficiency"]
    rows["disagrees"] |= recorded_eff.notna() & rows["efficiency_calc"].notna() & (
        (recorded_eff - rows["efficiency_calc"]).abs() > RECORDED_DISAGREES * rows["efficiency_calc"])
    return rows


def weak_frame(ctx: Context, cp: pd.DataFrame) -> pd.DataFrame:
    """One row per ok CP row that has a world-1 reference at its tokens per device: ``tokens_per_device``,
    ``t1``, ``flops_1``, ``time_ratio`` and ``weak_efficiency`` (see the module's docstring)."""
    ok = cp[(cp["status"] == "ok") & (cp["ms_median"] > 0)].copy()
    if ok.empty:
        return ok.assign(tokens_per_device=[], t1=[], time_ratio=[], weak_efficiency=[])
    ok["tokens_per_device"] = ok["x"] / ok["world"]
    key = ["run_dir", "source", "method", "mask", "pattern", "mode", "batch", "heads_q", "heads_kv", "head_dim",
           "dtype"]
    singles = ctx.rows[(ctx.rows["kind"] == "kernel") & (ctx.rows["status"] == "ok") & (ctx.rows["ms_median"] > 0)
                       & (ctx.rows["seq_q"] == ctx.rows["seq_kv"])]
    one = {}
    for _, row in singles.iterrows():
        one.setdefault((*[row[k] for k in key], float(row["x"])), (row["ms_median"], row["flops"]))
    own = {}  # the layout at world size 1 stands in when no one-device row exists
    for _, row in ok[ok["world"] == 1].iterrows():
        own.setdefault((row["layout"], *[row[k] for k in key], float(row["x"])), (row["ms_median"], row["flops"]))
    t1, f1 = [], []
    for _, row in ok.iterrows():
        at = (*[row[k] for k in key], float(row["tokens_per_device"]))
        ref = one.get(at) or own.get((row["layout"], *at)) if row["seq_q"] == row["seq_kv"] else None
        t1.append(ref[0] if ref else np.nan)
        f1.append(ref[1] if ref else np.nan)
    ok["t1"], ok["flops_1"] = np.asarray(t1, dtype=float), np.asarray(f1, dtype=float)
    ok = ok[ok["t1"].notna()]
    ok["time_ratio"] = ok["t1"] / ok["ms_median"]
    ok["weak_efficiency"] = (ok["flops"] / ok["flops_1"]) * ok["t1"] / (ok["world"] * ok["ms_median"])
    return ok


def section_cp(ctx: Context) -> Section | None:
    """The context-parallel section; None when the runs hold no CP row."""
    cp = cp_frame(ctx)
    if cp.empty:
        return None
    section = Section("cp", "Context-parallel layouts")
    section.blocks.append(Text(
        f"{len(cp)} case(s) on {cp['layout'].nunique()} context-parallel layout(s) "
        f"({', '.join(sorted(cp['layout'].unique()))}), world sizes "
        f"{', '.join(str(int(w)) for w in sorted(cp['world'].unique()))}. A CP row's time is the slowest rank's "
        "per call. Strong scaling: speed-up = t1 / tW for the same case on one device (the row's single_ms, else "
        "the one-device ok row of the same case in the run), efficiency = speed-up / W; ideal W and 1. Weak "
        "scaling holds the tokens per device T = seq_kv / W constant against the one-device row at length T: the "
        "time ratio t1(T) / tW(W·T) is 1 only for work linear in length (full attention on W·T tokens does W "
        "times the per-device work of T tokens, so its ideal time ratio is 1/W); the plotted weak efficiency "
        "(flops_W / flops_1) · t1 / (W · tW), per-device throughput at W over that at 1, is 1 when ideal for any "
        "cost model."))
    palette = plots.Palette(cp["tag"])
    impossible = cp[cp["impossible"]]
    if len(impossible):
        section.blocks.append(Text(
            "IMPOSSIBLE FIGURES: " + "; ".join(
                f"{r['tag']} {r['mask']} {r['mode']} {plots.tokens(r['x'])} on {int(r['world'])}: speed-up "
                f"{fmt(r['speedup_calc'])} > world size {int(r['world'])}" for _, r in impossible.iterrows())
            + ". A speed-up above the world size means the one-device time or the CP time is wrong; these rows "
            "are ringed in red below and must not be quoted."))
    disagree = cp[cp["disagrees"]]
    if len(disagree):
        section.blocks.append(Text(
            f"Warning: {len(disagree)} row(s) recorded a speed-up or efficiency that differs by more than "
            f"{RECORDED_DISAGREES:.0%} from single_ms / ms_median (/ world size): "
            + "; ".join(f"{r['tag']} {plots.tokens(r['x'])} on {int(r['world'])} (recorded "
                        f"{fmt(r['speedup'])}× / {fmt(r['efficiency'])}, recomputed {fmt(r['speedup_calc'])}× / "
                        f"{fmt(r['efficiency_calc'])})" for _, r in disagree.iterrows())
            + ". The report shows the recomputed figures."))
    section.blocks.extend(strong_blocks(cp, palette))
    section.blocks.extend(weak_blocks(weak_frame(ctx, cp), palette))
    section.blocks.extend(imbalance_blocks(cp))
    section.blocks.extend(bytes_blocks(cp, palette))
    section.blocks.extend(matrix_blocks(cp))
    section.blocks.append(numbers_table(cp))
    return section


def _series(rows: pd.DataFrame, metric: str) -> list[plots.Series]:
    return [plots.Series(tag, mine["world"].to_numpy(float), mine[metric].to_numpy(float))
            for tag, mine in sorted(rows.sort_values("world").groupby("tag"))]


def _figures(name: str, title: str, caption: str, rows_of_panels: list, palette) -> list:
    return [plot(f"{name}-{start}", title, caption, plots.scaling_panels, title,
                 rows_of_panels[start:start + ROWS_PER_FIGURE], palette)
            for start in range(0, len(rows_of_panels), ROWS_PER_FIGURE)]


def strong_blocks(cp: pd.DataFrame, palette) -> list:
    """Speed-up and efficiency against world size, one row of panels per (mask, pattern, mode, shape, length)."""
    measured = cp[cp["speedup_calc"].notna()]
    if measured.empty:
        return [Text("Strong scaling: no ok CP row has a one-device time of the same case to compare with.")]
    rows_of_panels = []
    keys = ["mask", "pattern", "mode", "case_shape", "x"]
    for (mask, pattern, mode, shape, x), rows in measured.sort_values(keys).groupby(keys, sort=False):
        heading = f"{mask} · {pattern} · {mode} · {shape} · {plots.tokens(x)} tokens"
        bad = list(zip(rows.loc[rows["impossible"], "world"], rows.loc[rows["impossible"], "speedup_calc"]))
        bad_eff = list(zip(rows.loc[rows["impossible"], "world"], rows.loc[rows["impossible"], "efficiency_calc"]))
        rows_of_panels.append((heading, [
            plots.ScalingPanel("speed-up over one device", "speed-up (×)", _series(rows, "speedup_calc"),
                               "speedup", bad),
            plots.ScalingPanel("strong-scaling efficiency", "efficiency (speed-up / W)",
                               _series(rows, "efficiency_calc"), "efficiency", bad_eff)]))
    return _figures("cp-strong", "Strong scaling per layout",
                    "Same case on W devices against one device; dashed: ideal (speed-up W, efficiency 1); red "
                    "rings: impossible figures (speed-up above W).", rows_of_panels, palette)


def weak_blocks(weak: pd.DataFrame, palette) -> list:
    """Weak efficiency and time ratio against world size, one row per (mask, pattern, mode, shape, T)."""
    weak = weak[weak["world"] > 1] if len(weak) else weak
    if weak.empty:
        return [Text("Weak scaling: no CP row has a one-device (or world size 1) row at its tokens per device.")]
    rows_of_panels, table = [], []
    keys = ["mask", "pattern", "mode", "case_shape", "tokens_per_device"]
    for (mask, pattern, mode, shape, tokens), rows in weak.sort_values(keys).groupby(keys, sort=False):
        heading = f"{mask} · {pattern} · {mode} · {shape} · {plots.tokens(tokens)} tokens per device"
        rows_of_panels.append((heading, [
            plots.ScalingPanel("weak efficiency (work-normalised)", "per-device throughput vs one device",
                               _series(rows, "weak_efficiency"), "efficiency"),
            plots.ScalingPanel("time ratio t1(T) / tW(W·T)", "time ratio", _series(rows, "time_ratio"))]))
        for _, r in rows.sort_values(["tag", "world"]).iterrows():
            table.append([r["tag"], heading, str(int(r["world"])), plots.tokens(r["x"]), fmt(r["t1"]),
                          fmt(r["ms_median"]), fmt(r["time_ratio"]), fmt(r["weak_efficiency"])])
    return [*_figures("cp-weak", "Weak scaling per layout (constant tokens per device)",
                      "Tokens per device held constant. Left: weak efficiency (flops_W / flops_1) · t1 / (W · tW), "
                      "ideal 1 (dashed). Right: the plain time ratio t1 / tW, without an ideal line: it is 1 only "
                      "for work linear in length (1/W for full attention).", rows_of_panels, palette),
            Table(["layout", "case", "world size", "length", "t1 (ms)", "tW (ms)", "time ratio", "weak efficiency"],
                  table, "Weak scaling numbers.", collapsed=len(table) > 12)]


def imbalance_blocks(cp: pd.DataFrame) -> list:
    """Per-rank time bars of the longest case of each layout (then the largest world size)."""
    with_ranks = cp[(cp["status"] == "ok") & cp["rank_ms"].map(rank_times).notna()] if "rank_ms" in cp else cp[:0]
    if with_ranks.empty:
        return [Text("Per-rank imbalance: no ok CP row recorded per-rank times (rank_ms).")]
    cases = []
    for tag, rows in sorted(with_ranks.groupby("tag")):
        r = rows.sort_values(["x", "world", "ms_median"], ascending=[False, False, False]).iloc[0]
        times = rank_times(r["rank_ms"])
        cases.append(plots.RankBars(
            f"{tag}\n{r['mask']} · {r['mode']} · {plots.tokens(r['x'])} · W={int(r['world'])} · "
            f"max/mean {fmt(max(times) / np.mean(times))}", times))
    return [plot(f"cp-imbalance-{start}", "per-rank time of the longest case per layout",
                 "Each rank's median time per call for the longest case of each layout (largest world size "
                 "among those); dashed: the mean; the slowest rank (which sets the case's time) is dark.",
                 plots.rank_bars, "Per-rank time, longest case per layout", cases[start:start + BARS_PER_FIGURE])
            for start in range(0, len(cases), BARS_PER_FIGURE)]


def bytes_blocks(cp: pd.DataFrame, palette) -> list:
    """Bytes sent per rank against time per call, one marker per layout."""
    measured = cp[(cp["status"] == "ok") & (cp["comm_bytes"] > 0) & (cp["ms_median"] > 0)]
    if measured.empty:
        return [Text("Communication: no ok CP row recorded comm_bytes (torch_cp's traffic is not counted).")]
    points = [plots.Points(tag, rows["comm_bytes"].to_numpy(float) / 1e6, rows["ms_median"].to_numpy(float))
              for tag, rows in sorted(measured.groupby("tag"))]
    return [plot("cp-bytes", "bytes sent per rank against time per call",
                 "Each ok CP case: bytes one rank sends per call (max over ranks, from the algorithm) against the "
                 "time per call. Points on one diagonal move bytes at the same rate (comm_gbps in the table).",
                 plots.scatter, "Communication bytes against time per call", points, palette,
                 "bytes sent per rank per call (MB)", "time per call (ms)")]


def matrix_blocks(cp: pd.DataFrame) -> list:
    """Layout × mask: the worst status of each cell with counts; reasons on hover and as footnotes."""
    columns = sorted(cp["mask"].unique())
    tags = sorted(cp["tag"].unique())
    notes: dict[tuple, int] = {}
    note_rows, cells = [], {}
    for (tag, mask), rows in cp.groupby(["tag", "mask"]):
        counts = rows["status"].value_counts()
        ordered = [s for s in SEVERITY if s in counts] + [s for s in counts.index if s not in SEVERITY]
        text = ordered[0] if len(ordered) == 1 else " · ".join(f"{s} {counts[s]}" for s in ordered)
        marks, titles = [], []
        for (status, reason), failed in rows[rows["status"] != "ok"].groupby(["status", "reason"]):
            key = (tag, mask, status, reason)
            if key not in notes:
                notes[key] = len(notes) + 1
                where = ", ".join(sorted({f"{m} {plots.tokens(x)} W={int(w)}"
                                          for m, x, w in zip(failed["mode"], failed["x"], failed["world"])}))
                note_rows.append([str(notes[key]), Cell(status, status), tag, mask, where,
                                  reason or "(no reason recorded)"])
            marks.append(f"[{notes[key]}]")
            titles.append(f"{status} ×{len(failed)}: {reason or '(no reason recorded)'}")
        cells[(tag, mask)] = Cell(text + (" " + "".join(marks) if marks else ""), ordered[0],
                                  "\n".join(titles) if titles else None)
    matrix = [[tag, *[cells.get((tag, mask), Cell("not run")) for mask in columns]] for tag in tags]
    blocks = [Table(["layout", *columns], matrix,
                    "Context-parallel capability: status of every case by layout and mask (worst status colours the "
                    "cell; hover for reasons; numbers refer to the reasons below).")]
    if note_rows:
        blocks.append(Table(["#", "status", "layout", "mask", "cases (mode, length, world size)", "reason"],
                            note_rows, "Reasons for every CP status but ok."))
    return blocks


def numbers_table(cp: pd.DataFrame) -> Table:
    """Every CP row with its scaling figures; impossible speed-ups marked."""
    table = []
    for _, r in cp.sort_values(["tag", "mask", "mode", "x", "world"]).iterrows():
        speedup = fmt(r["speedup_calc"])
        if r["impossible"]:
            speedup = Cell(f"{speedup}× IMPOSSIBLE (> {int(r['world'])})", "wrong",
                           "a speed-up above the world size: the one-device or the CP time is wrong")
        elif speedup:
            speedup = f"{speedup}×"
        table.append([r["tag"], r["mask"], r["mode"], r["case_shape"], plots.tokens(r["x"]), str(int(r["world"])),
                      status_cell(r), fmt(r["ms_median"]), fmt(r["ms_rank_max"]), fmt(r["imbalance"]),
                      fmt(r["comm_bytes"] / 1e6), fmt(r["comm_gbps"]), fmt(r["one_ms"]), speedup,
                      fmt(r["efficiency_calc"]), "recorded differs" if r["disagrees"] else ""])
    return Table(["layout", "mask", "mode", "shape", "length", "world size", "status", "time (ms)",
                  "slowest rank (ms)", "imbalance", "MB sent per rank", "GB/s per rank", "one device (ms)",
                  "speed-up", "efficiency", "check"], table,
                 "Every context-parallel case. Speed-up and efficiency are recomputed from the one-device time; "
                 "'recorded differs': the row's own speedup/efficiency columns disagree with the recomputation.",
                 collapsed=len(table) > 20)
