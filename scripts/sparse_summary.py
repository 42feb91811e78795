#!/usr/bin/env python3
"""Per-method figures of a routed/sparse/local run (issue 9) from its rows, as markdown.

usage: python scripts/sparse_summary.py RUN_DIR [--baseline sdpa_cudnn]

For every method (mask = full or causal, mode = fwd / fwd_bwd), from rows with status ok:
- **rate**: TFLOP/s on the pairs the method attends (``tflops_attended``) and that rate as a share of the
  baseline's dense (``full``) fwd TFLOP/s at the same length - the attention part at the method's own work;
  the whole method includes its routing in the time, so this is the routing-included rate;
- **efficiency length**: the shortest length at which the method's causal ``fwd_bwd`` time is below the
  baseline's causal ``fwd_bwd`` time (full for methods without a causal form, marked), or "none <= L_max";
- **slope**: least-squares slope of log(time) against log(length) per (method, mask, mode), over the lengths
  measured (at least two), with the lengths it used;
- **approx_err** (against exact softmax on the same inputs) and the routing share of the call, at each
  method's longest forward length.
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


def slopes(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (method, mask, mode), group in _ok(frame).groupby(["method", "mask", "mode"]):
        group = group.groupby("seq_q").ms_median.median()
        fitted = slope(group.index, group.values)
        if fitted is not None:
            rows.append({"method": method, "mask": mask, "mode": mode, "slope": fitted,
                         "lengths": f"{_k(group.index.min())}-{_k(group.index.max())} ({len(group)})"})
    return pd.DataFrame(rows, columns=["method", "mask", "mode", "slope", "lengths"])


def rates(frame: pd.DataFrame, baseline: str) -> pd.DataFrame:
    ok = _ok(frame)
    dense = ok[(ok.method == baseline) & (ok["mask"] == "full") & (ok["mode"] == "fwd")]
    dense = dense.groupby("seq_q").tflops.median()
    fwd = ok[(ok["mode"] == "fwd") & ok.tflops_attended.notna()]
    rows = []
    for _, row in fwd.sort_values(["method", "mask", "seq_q"]).iterrows():
        ref = dense.get(row.seq_q)
        rows.append({"method": row.method, "mask": row["mask"], "seq": row.seq_q, "ms": row.ms_median,
                     "tflops_attended": row.tflops_attended,
                     "of_dense": row.tflops_attended / ref if ref else float("nan")})
    return pd.DataFrame(rows, columns=["method", "mask", "seq", "ms", "tflops_attended", "of_dense"])


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


def render(frame: pd.DataFrame, baseline: str = "sdpa_cudnn") -> str:
    counts = frame.groupby("status").size().to_dict()
    parts = [f"# Sparse methods: {len(frame)} rows ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})\n",
             f"## Rate (fwd): TFLOP/s on attended pairs, share of {baseline} dense fwd at the same length\n",
             _table(rates(frame, baseline), {"ms": ".3g", "tflops_attended": ".3g", "of_dense": ".0%"}),
             f"## Efficiency length: shortest length where fwd_bwd beats {baseline} (causal; full where the method "
             "has no causal form)\n",
             _table(efficiency_lengths(frame, baseline), {"speedup_at_longest": ".2f"}),
             "## Log-log slope of time against length\n",
             _table(slopes(frame), {"slope": ".2f"}),
             "## approx_err and routing share at the longest forward length\n",
             _table(fidelity(frame), {"approx_err": ".3g", "routing_share": ".0%"})]
    not_ok = frame[frame.status != "ok"]
    if len(not_ok):
        parts.append("## Rows not ok\n")
        shown = not_ok[["method", "mask", "mode", "seq_q", "status", "reason"]].copy()
        shown["reason"] = shown.reason.astype(str).str.slice(0, 120)
        parts.append(_table(shown.rename(columns={"seq_q": "seq"}), {}))
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--baseline", default="sdpa_cudnn")
    args = parser.parse_args(argv)
    sys.stdout.write(render(load(args.run_dir), args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
