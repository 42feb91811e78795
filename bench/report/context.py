"""What every section reads: the merged rows with derived columns, the single-device kernel rows, the baseline.

``build_context(runs, baseline)`` prepares the rows once; sections select from them and never re-derive.
"""
from __future__ import annotations

import json

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from attnbench.record.rundir import Run, merge_runs
from attnbench.report import plots
from attnbench.report.formatting import NOT_RECORDED
from attnbench.report.maths import SLOPE_FIT_FROM

MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd_bwd": 2, "decode": 3}
# numeric columns the report reads; those the rows lack (e.g. approx_err before it is recorded) come back as NaN
METRICS = ("ms_median", "ms_p20", "ms_p80", "tflops", "tflops_attended", "gbps", "peak_mem_mb", "flops", "bytes_moved",
           "sm_clock_mhz", "power_w", "temp_c", "approx_err")
CASE_FIELDS = ("source", "mask", "pattern", "mode", "batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim",
               "dtype", "layout", "world_size", "seed")
KERNEL_COLUMNS = (*CASE_FIELDS, "label", "method", "run_dir", "figure", "group", "shape", "x", "status", "reason",
                  "is_exact", "ms_median", "ms_p20", "ms_p80", "tflops", "tflops_attended", "gbps", "peak_mem_mb", "flops", "bytes_moved",
                  "peak_fraction", "approx_err")


@dataclass
class Context:
    """What every section reads.

    ``rows``: merged rows with derived columns (see ``prepare_rows``); ``kernel``: the single-device kernel rows
    (no context-parallel layout) with only ``KERNEL_COLUMNS``, so that the many per-figure selections stay
    cheap; ``baseline``: the --baseline method or None; ``palette``: one line style per label; ``slope_from``:
    the shortest length (tokens) of the scaling section's slope fits (--slope-from).
    """

    runs: list[Run]
    rows: pd.DataFrame
    kernel: pd.DataFrame
    baseline: str | None
    palette: plots.Palette
    slope_from: int = SLOPE_FIT_FROM


def build_context(runs: list[Run], baseline: str | None = None, slope_from: int = SLOPE_FIT_FROM,
                  one_source: bool = False) -> Context:
    """Prepare the rows of ``runs`` once for every section (``one_source``: see ``prepare_rows``)."""
    rows = prepare_rows(runs, one_source)
    kernel = rows.loc[rows["kind"] == "kernel", list(KERNEL_COLUMNS)]
    # object columns: element access on Arrow-backed strings is slow in the per-figure loops
    kernel = kernel.astype({c: object for c in kernel.columns if pd.api.types.is_string_dtype(kernel[c])})
    return Context(runs, rows, kernel, baseline, plots.Palette(rows["label"]), slope_from)


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


def options_text(options: object) -> str:
    """``method_options`` JSON as a short label part: ``impl=flex, chunk=64`` (empty when none)."""
    if options is None or options is pd.NA or (isinstance(options, float) and np.isnan(options)) or options == "":
        return ""
    try:
        parsed = json.loads(str(options))
    except ValueError:
        return str(options)
    if not isinstance(parsed, dict):
        return str(parsed)
    return ", ".join(f"{key}={value}" for key, value in sorted(parsed.items()))


def varying_options(rows: pd.DataFrame) -> pd.Series:
    """Per row, the options that tell its method's option sets apart (``impl=strided``; keys equal in every set
    are left out; ``defaults`` for a row with none), or NA where the method was measured with one set only. A row's
    options are its ``method_options`` overlaid by its ``resolved_options`` (what an ``auto`` default ran), so a
    row that asked for a path and one whose default chose it carry the same label. Positional: merged runs'
    rows repeat index labels (each run's rows count from 0)."""
    def parse(text):
        value = json.loads(text) if options_text(text) else {}
        return value if isinstance(value, dict) else {}

    none = [None] * len(rows)
    given = [parse(t) for t in (rows["method_options"] if "method_options" in rows else none)]
    resolved = [parse(t) for t in (rows["resolved_options"] if "resolved_options" in rows else none)]
    parsed = [{**g, **r} for g, r in zip(given, resolved)]
    out = [pd.NA] * len(rows)
    methods = rows["method"].to_numpy()
    for method in pd.unique(methods):
        where = [i for i in range(len(rows)) if methods[i] == method]
        sets = [parsed[i] for i in where]
        if len({json.dumps(d, sort_keys=True, default=str) for d in sets}) < 2:
            continue
        keys = sorted({key for d in sets for key in d})
        varying = [key for key in keys if len({json.dumps(d.get(key), default=str) for d in sets}) > 1]
        for i, d in zip(where, sets):
            out[i] = ", ".join(f"{k}={d[k]}" for k in varying if k in d) or "defaults"
    return pd.Series(out, index=rows.index, dtype=object)


def prepare_rows(runs: list[Run], one_source: bool = False) -> pd.DataFrame:
    """Merged rows plus derived columns; with ``one_source`` the runs are one comparison (no per-run tables,
    e.g. one run per implementation of a method).

    ``label`` (method; its options in brackets where the rows hold the method with more than one set of
    ``method_options``; and the source when merged), ``is_exact``, ``kind`` (kernel, or cp for a context-parallel
    layout or a world size above 1), ``shape`` (see ``shape_labels``),
    ``figure`` (mask · pattern · mode: one curve figure), ``group`` (figure · shape: one row of it, one table,
    one efficiency-length comparison), ``x`` (key/value length, tokens), ``peak_fraction``
    (TFLOP/s over the run's measured bf16 matmul peak), metric columns as float64 with NaN when not measured.
    """
    rows = merge_runs(runs, one_source)
    for column in METRICS:
        if column in rows:
            rows[column] = pd.to_numeric(rows[column], errors="coerce").astype("Float64").to_numpy(
                dtype=float, na_value=np.nan)
        else:
            rows[column] = np.nan
    for column in ("method", "mask", "pattern", "mode", "dtype", "family", "status"):
        rows[column] = rows[column].fillna(NOT_RECORDED).astype(str)
    rows["reason"] = rows["reason"].fillna("").astype(str)
    rows["layout"] = rows["layout"].fillna("single").astype(str)
    options = varying_options(rows)
    method = np.where(options.notna(), rows["method"] + " [" + options.fillna("") + "]", rows["method"])
    rows["label"] = np.where(rows["source"] == "", method, pd.Series(method, index=rows.index) + " · " + rows["source"])
    rows["is_exact"] = rows["exact"].fillna(rows["family"] == "exact").astype(bool)
    cp = (rows["layout"] != "single") | (rows["world_size"].fillna(1) > 1)
    rows["kind"] = np.where(cp, "cp", "kernel")
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


def length_sort(values) -> list:
    """The distinct measured values (lengths), ascending, without NaN."""
    return sorted(v for v in set(values) if pd.notna(v))


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
