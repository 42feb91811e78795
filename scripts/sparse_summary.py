#!/usr/bin/env python3
"""Per-method figures of a routed/sparse/local run (issue 9) from its rows, as markdown.

usage: python scripts/sparse_summary.py RUN_DIR [RUN_DIR ...] [--from RUN_DIR=METHOD[,METHOD]] [--baseline sdpa_cudnn]
       [--grid 4096,16384,65536,262144,1048576]

Several runs are read as one; ``--from RUN=m1,m2`` takes methods m1 and m2 from that run only (their rows in the
other runs are dropped), e.g. halo and long_short from their implementation runs while the main run holds their
first implementations. A method named in several ``--from`` takes its rows from those runs, and where two of them
hold the same case (mask, mode, lengths) the run named later wins: ``--from old=m --from new=m`` reads m's new
measurements and keeps the old run's rows for the lengths the new run did not measure. A row that sets an option
of another code path (``VARIANTS``: superlinear's ``query_order``, probsparse's ``measure``) is a line of its own,
``superlinear [query_order=sorted]``, never merged with the other code path's rows (the grid coverage counts it
under its method).

For every method (mask = full or causal, mode = fwd / fwd_bwd), from rows with status ok:
- **rate**: TFLOP/s on the pairs the method attends (``tflops_attended``, the whole call: routing included) and
  the attention part's rate (the same pairs over the time without the declared routing phase,
  ``tflops_attended / (1 - routing_share)``), each as a share of the baseline's dense (``full``) fwd TFLOP/s at
  the same length (the issue's targets: attention part >= 80 %, whole method >= 60 %);
- **efficiency length**: the shortest length at which the method's causal ``fwd_bwd`` time is below the
  baseline's causal ``fwd_bwd`` time (full for methods without a causal form, marked), or "none <= L_max";
- **slope**: least-squares slope of log(time) against log(length) per (method, mask, mode), over the lengths
  measured (at least two), with the lengths it used, and over the lengths >= 64K alone (``LONG_FIT``: the
  asymptotic slope, without the short lengths' launch and routing overheads);
- **approx_err** (against exact softmax on the same inputs) and the routing share of the call, at each
  method's longest forward length;
- **grid coverage** (with ``--grid``): every (method, full/causal, length, fwd/fwd_bwd) cell of the grid that has
  no row at all in any of the runs (``--from`` included) (a row of any status, ``unsupported`` or ``timeout`` included, says why not).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from attnbench.report.maths import loglog_slope


def load(run_dir: Path) -> pd.DataFrame:
    run_dir = Path(run_dir)
    if (run_dir / "rows.parquet").is_file():
        return pd.read_parquet(run_dir / "rows.parquet")
    return pd.read_json(run_dir / "rows.jsonl", lines=True)


CASE_KEY = ["variant", "mask", "mode", "seq_q", "seq_kv"]
"""What makes two rows of one method the same case across runs (the later ``--from`` run's row wins): a row of
another code path (``variant``) is another case."""

VARIANTS = {"query_order": ("natural",), "measure": ("torch",), "search": ("auto", "triton")}
"""The options that pick another code path of a sparse method, with the value(s) its rows meant before the option
was set (rows written before an option existed do not carry it): a row that sets one to another value (in
method_options, or in resolved_options: what an ``auto`` default chose) is its own line,
``superlinear [query_order=sorted]``, so that two code paths are never merged into one line or slope. superlinear's
search has been the Triton kernel on CUDA (``auto``) since the twelfth session: only ``search=torch`` is a line of
its own."""


def with_variants(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a ``variant`` column: the method's line label from its rows' method_options (VARIANTS)."""
    if str(Path(__file__).parent) not in sys.path:  # the sibling script, also when this one is loaded by path
        sys.path.insert(0, str(Path(__file__).parent))
    from linear_summary import impl_label, row_options

    return frame.assign(variant=[impl_label(m, o, VARIANTS) for m, o in zip(frame["method"], row_options(frame))])


def combine(frames: dict[str, pd.DataFrame], take: dict[str, str | list[str]]) -> pd.DataFrame:
    """Rows of several runs as one frame (column ``source`` = the run); ``take`` maps a method to the run (or the
    runs, in order) its rows come from: with several, a case both hold is taken from the later run (a method named
    there with no row in one of its runs is an error: a typo would drop it silently)."""
    take = {method: [runs] if isinstance(runs, str) else list(runs) for method, runs in take.items()}
    for method, runs in take.items():
        for run in runs:
            if run not in frames:
                raise SystemExit(f"--from {run}={method}: {run} is not among the runs given")
            if not (frames[run].method == method).any():
                raise SystemExit(f"--from {run}={method}: {run} has no row of {method}")
    parts = []
    for run, frame in frames.items():
        frame = frame.assign(source=run)
        keep = frame.method.map(lambda m: m not in take or run in take[m])
        frame = frame[keep]
        for method, runs in take.items():
            if run not in runs or runs.index(run) == len(runs) - 1:
                continue
            key = [k for k in CASE_KEY if k in frame]
            later = pd.concat([frames[r][frames[r].method == method][key] for r in runs[runs.index(run) + 1:]])
            mine = frame[frame.method == method]
            shadowed = mine[key].merge(later.drop_duplicates(), how="left", on=key, indicator=True)
            drop = mine.index[(shadowed["_merge"] == "both").to_numpy()]
            frame = frame.drop(index=drop)
        parts.append(frame)
    frame = pd.concat(parts, ignore_index=True)
    return frame.assign(method=frame["variant"]) if "variant" in frame else frame


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    """ok rows of self attention (cross rows, seq_q != seq_kv, have their own length axis: left out)."""
    frame = frame[frame.status == "ok"].copy()
    if "seq_kv" in frame:
        frame = frame[frame.seq_kv.isna() | (frame.seq_kv == frame.seq_q)]
    for column in ("tflops_attended", "approx_err", "routing_share"):
        if column not in frame:
            frame[column] = float("nan")
    return frame


def slope(lengths, times) -> float | None:
    """Least-squares slope of log(time) on log(length) (attnbench.report.maths.loglog_slope; this script's
    table keeps its two-length minimum, the report's scaling section needs three)."""
    return loglog_slope(lengths, times, min_points=2)


LONG_FIT = 65536
"""The long-length slope fits lengths >= this: below it launch and routing overheads flatten the curves (the
all-length slopes of the routed methods read 0.8-1.0 where the issue expects ~1.5 asymptotically)."""


def slopes(frame: pd.DataFrame, long_fit: int = LONG_FIT) -> pd.DataFrame:
    """Per (method, mask, mode): the slope over every ok length, and over lengths >= ``long_fit`` (None with
    fewer than two there)."""
    rows = []
    for (method, mask, mode), group in _ok(frame).groupby(["method", "mask", "mode"]):
        group = group.groupby("seq_q").ms_median.median()
        fitted = slope(group.index, group.values)
        if fitted is not None:
            long = group[group.index >= long_fit]
            rows.append({"method": method, "mask": mask, "mode": mode, "slope": fitted,
                         "lengths": f"{_k(group.index.min())}-{_k(group.index.max())} ({len(group)})",
                         f"slope_ge_{long_fit // 1024}K": slope(long.index, long.values) if len(long) >= 2 else None,
                         "long_lengths": ", ".join(_k(n) for n in long.index) if len(long) >= 2 else ""})
    return pd.DataFrame(rows, columns=["method", "mask", "mode", "slope", "lengths", f"slope_ge_{long_fit // 1024}K",
                                       "long_lengths"])


def rates(frame: pd.DataFrame, baseline: str) -> pd.DataFrame:
    ok = _ok(frame)
    dense = ok[(ok.method == baseline) & (ok["mask"] == "full") & (ok["mode"] == "fwd")]
    dense = dense.groupby("seq_q").tflops.median()
    fwd = ok[(ok["mode"] == "fwd") & ok.tflops_attended.notna()]
    rows = []
    for _, row in fwd.sort_values(["method", "mask", "seq_q"]).iterrows():
        ref = dense.get(row.seq_q)
        share = row.routing_share if pd.notna(row.routing_share) and row.routing_share < 1 else 0.0
        part = row.tflops_attended / (1.0 - share)
        rows.append({"method": row.method, "mask": row["mask"], "seq": row.seq_q, "ms": row.ms_median,
                     "tflops_attended": row.tflops_attended,
                     "of_dense": row.tflops_attended / ref if ref else float("nan"),
                     "attention_part": part, "part_of_dense": part / ref if ref else float("nan")})
    return pd.DataFrame(rows, columns=["method", "mask", "seq", "ms", "tflops_attended", "of_dense",
                                       "attention_part", "part_of_dense"])


def missing_cells(frame: pd.DataFrame, lengths, masks=("full", "causal"), modes=("fwd", "fwd_bwd")) -> pd.DataFrame:
    """Cells of the grid (every method in the rows x masks x lengths x modes) without any row."""
    have = set(zip(frame.method, frame["mask"], frame.seq_q.astype(int), frame["mode"]))
    rows = [{"method": m, "mask": mask, "seq": length, "mode": mode}
            for m in sorted(set(frame.method)) for mask in masks for length in lengths for mode in modes
            if (m, mask, int(length), mode) not in have]
    return pd.DataFrame(rows, columns=["method", "mask", "seq", "mode"])


def efficiency_lengths(frame: pd.DataFrame, baseline: str) -> pd.DataFrame:
    ok = _ok(frame)
    ok = ok[ok["mode"] == "fwd_bwd"]
    rows = []
    for method in sorted(set(ok.method) - {baseline}):
        mine = ok[ok.method == method]
        mask = "causal" if (mine["mask"] == "causal").any() else "full"
        times = mine[mine["mask"] == mask].groupby("seq_q").ms_median.median()
        base = ok[(ok.method == baseline) & (ok["mask"] == mask)].groupby("seq_q").ms_median.median()
        common = sorted(set(times.index) & set(base.index))
        if not common:
            continue
        wins = [length for length in common if times[length] < base[length]]
        rows.append({"method": method, "mask": mask, "efficiency_length": _k(wins[0]) if wins else
                     f"none <= {_k(common[-1])}", "lengths": ", ".join(_k(x) for x in common),
                     "speedup_at_longest": base[common[-1]] / times[common[-1]]})
    return pd.DataFrame(rows, columns=["method", "mask", "efficiency_length", "lengths", "speedup_at_longest"])


def fidelity(frame: pd.DataFrame) -> pd.DataFrame:
    ok = _ok(frame)
    ok = ok[(ok["mode"] == "fwd") & ok.approx_err.notna()]
    rows = []
    for (method, mask), group in ok.groupby(["method", "mask"]):
        last = group.sort_values("seq_q").iloc[-1]
        rows.append({"method": method, "mask": mask, "seq": last.seq_q, "approx_err": last.approx_err,
                     "routing_share": last.routing_share})
    return pd.DataFrame(rows, columns=["method", "mask", "seq", "approx_err", "routing_share"])


def _k(length) -> str:
    length = int(length)
    return f"{length // 1048576}M" if length % 1048576 == 0 else f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _table(frame: pd.DataFrame, floats: dict[str, str]) -> str:
    if frame.empty:
        return "(no rows)\n"
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for _, row in frame.iterrows():
        cells = []
        for column in frame.columns:
            value = row[column]
            if column == "seq":
                cells.append(_k(value))
            elif column in floats and isinstance(value, float):
                cells.append("" if math.isnan(value) else format(value, floats[column]))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(frame: pd.DataFrame, baseline: str = "sdpa_cudnn", grid=None, covered: pd.DataFrame | None = None) -> str:
    """The summary of ``frame``; the grid coverage (``grid``) counts a cell covered where ``covered`` (default
    ``frame``: the union of all runs before ``--from``) has a row for it: a method taken from one run keeps the
    other runs' rows for the cells that run did not plan (superlinear's ``unsupported`` full-mask rows)."""
    counts = frame.groupby("status").size().to_dict()
    parts = [f"# Sparse methods: {len(frame)} rows ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})\n"]
    if "source" in frame and frame.source.nunique() > 1:
        by_run = frame.groupby("source").method.unique()
        parts.append("Runs: " + "; ".join(f"`{run}` ({', '.join(sorted(methods))})" for run, methods in by_run.items())
                     + "\n")
    parts += [f"## Rate (fwd): TFLOP/s on attended pairs, whole call and attention part (routing phase left out), "
              f"share of {baseline} dense fwd at the same length\n",
             _table(rates(frame, baseline), {"ms": ".3g", "tflops_attended": ".3g", "of_dense": ".0%",
                                             "attention_part": ".3g", "part_of_dense": ".0%"}),
             f"## Efficiency length: shortest length where fwd_bwd beats {baseline} (causal; full where the method "
             "has no causal form)\n",
             _table(efficiency_lengths(frame, baseline), {"speedup_at_longest": ".2f"}),
             "## Log-log slope of time against length\n",
             _table(slopes(frame), {"slope": ".2f", f"slope_ge_{LONG_FIT // 1024}K": ".2f"}),
             "## approx_err and routing share at the longest forward length\n",
             _table(fidelity(frame), {"approx_err": ".3g", "routing_share": ".0%"})]
    if grid:
        covered = frame if covered is None else covered
        missing = missing_cells(covered, grid)
        parts.append(f"## Grid cells without a row ({len(missing)} of "
                     f"{covered.method.nunique() * 2 * len(grid) * 2}: methods x full/causal x "
                     f"{', '.join(_k(x) for x in grid)} x fwd/fwd_bwd)\n")
        parts.append(_table(missing, {}))
    not_ok = frame[frame.status != "ok"]
    if len(not_ok):
        parts.append("## Rows not ok\n")
        shown = not_ok[["method", "mask", "mode", "seq_q", "status", "reason"]].copy()
        shown["reason"] = shown.reason.astype(str).str.slice(0, 120)
        parts.append(_table(shown.rename(columns={"seq_q": "seq"}), {}))
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="+")
    parser.add_argument("--from", dest="take", action="append", default=[], metavar="RUN=METHOD[,METHOD]",
                        help="take these methods' rows from this run only")
    parser.add_argument("--baseline", default="sdpa_cudnn")
    parser.add_argument("--grid", default=None, help="comma-separated lengths: list the grid cells without a row")
    args = parser.parse_args(argv)
    frames = {str(run): with_variants(load(run)) for run in args.run_dir}
    take = {}
    for item in args.take:
        run, _, methods = item.partition("=")
        if not methods:
            parser.error(f"--from {item!r}: expected RUN=METHOD[,METHOD]")
        for method in methods.split(","):
            take.setdefault(method, []).append(str(Path(run)))
    frame = combine({str(Path(r)): f for r, f in frames.items()}, take)
    grid = [int(x) for x in args.grid.split(",")] if args.grid else None
    union = pd.concat(frames.values(), ignore_index=True)
    sys.stdout.write(render(frame, args.baseline, grid, covered=union))
    return 0


if __name__ == "__main__":
    sys.exit(main())
