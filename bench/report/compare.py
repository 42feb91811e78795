"""`attnbench compare BASE NEW`: time ratio NEW / BASE per case, a summary, and a regression verdict for CI.

Cases match on ``bench.schema.KEY_FIELDS`` (method, mask, shape, length, dtype, mode, layout, seed), never on the
device, so two machines or two commits can be compared. For a case measured (status ok) in both runs:

- **regression** when NEW is slower by more than the threshold (ratio > 1 + threshold) *and* beyond both
  runs' recorded spread: NEW's p20 is above BASE's p80, so the two p20–p80 intervals do not overlap;
- **improvement** symmetrically: ratio < 1 - threshold and NEW's p80 below BASE's p20;
- **within spread** when the ratio passes the threshold but the intervals overlap; **unchanged** otherwise
  (**not timed** if a side has no median time).

A case ok in BASE and failed in NEW is a regression too (``ok → oom`` ...); failed → ok is ``fixed``. Cases in one
run only are listed, never called regressions. ``--fail-on-regression`` exits 1 when any regression is found.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from attnbench.record.rundir import UsageError, load_runs, parse_args
from attnbench.record.schema import KEY_FIELDS

VERDICTS = ("regression", "new failure", "improvement", "fixed", "within spread", "unchanged", "not timed",
            "still failing", "only in BASE", "only in NEW")
REGRESSIONS = ("regression", "new failure")


def parse_threshold(text: str) -> float:
    """"5%" or "0.05" -> 0.05. A bare number of 1 or more is refused as ambiguous."""
    value = text.strip()
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a threshold: {text!r} (write 5% or 0.05)") from None
    if not value.endswith("%") and number >= 1:
        raise argparse.ArgumentTypeError(f"ambiguous threshold {text!r}: write {value}% or {number / 100:g}")
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"threshold {text!r} must be between 0% and 100%")
    return number


def case_key(rows: pd.DataFrame) -> pd.Series:
    """One string per row from the key fields (missing values included as empty)."""
    key = pd.Series("", index=rows.index, dtype=object)
    for field in KEY_FIELDS:
        key = key + "|" + rows[field].astype("string").fillna("").astype(str)
    return key


def verdict(row, threshold: float) -> str:
    """The verdict of one matched case (see the module docstring)."""
    base_ok, new_ok = row["status_base"] == "ok", row["status_new"] == "ok"
    if _text(row["status_base"]) == "":
        return "only in NEW"
    if _text(row["status_new"]) == "":
        return "only in BASE"
    if base_ok and not new_ok:
        return "new failure"
    if new_ok and not base_ok:
        return "fixed"
    if not base_ok:
        return "still failing"
    ratio = row["ratio"]
    if not math.isfinite(ratio):
        return "not timed"  # ok in both, but a median time is missing on one side
    base_low, base_high = _spread(row, "base")
    new_low, new_high = _spread(row, "new")
    if ratio > 1 + threshold:
        return "regression" if new_low > base_high else "within spread"
    if ratio < 1 - threshold:
        return "improvement" if new_high < base_low else "within spread"
    return "unchanged"


def _spread(row, side: str) -> tuple[float, float]:
    """(p20, p80) of one side; the median for a bound that was not recorded."""
    median = row[f"ms_median_{side}"]
    low, high = row[f"ms_p20_{side}"], row[f"ms_p80_{side}"]
    return (median if pd.isna(low) else low), (median if pd.isna(high) else high)


def compare_rows(base: pd.DataFrame, new: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """One row per case in either run: key fields, each side's status, reason and times (suffixes _base, _new),
    ``ratio`` (NEW / BASE median time), ``mem_ratio`` and ``verdict``; regressions first, then worst ratio first."""
    measured = ["status", "reason", "ms_median", "ms_p20", "ms_p80", "peak_mem_mb"]
    sides = []
    for rows in (base, new):
        side = rows[[*KEY_FIELDS, *measured]].astype(object)
        side = side.where(side.notna(), None)
        sides.append(side.set_index(case_key(rows)).loc[lambda f: ~f.index.duplicated(keep="last")])
    keys = sides[0].index.union(sides[1].index, sort=False)
    fields = sides[0][list(KEY_FIELDS)].reindex(keys).combine_first(sides[1][list(KEY_FIELDS)].reindex(keys))
    merged = pd.concat([fields[list(KEY_FIELDS)], sides[0][measured].reindex(keys).add_suffix("_base"),
                        sides[1][measured].reindex(keys).add_suffix("_new")], axis=1)
    for column in ("ms_median", "ms_p20", "ms_p80", "peak_mem_mb"):
        for side in ("base", "new"):
            merged[f"{column}_{side}"] = pd.to_numeric(merged[f"{column}_{side}"], errors="coerce").astype(float)
    both = (merged["status_base"] == "ok") & (merged["status_new"] == "ok")
    merged["ratio"] = np.where(both, merged["ms_median_new"] / merged["ms_median_base"], np.nan)
    merged["mem_ratio"] = np.where(both, merged["peak_mem_mb_new"] / merged["peak_mem_mb_base"], np.nan)
    merged["verdict"] = [verdict(row, threshold) for _, row in merged.iterrows()]
    merged["order"] = merged["verdict"].map({v: i for i, v in enumerate(VERDICTS)})
    merged = merged.sort_values(["order", "ratio"], ascending=[True, False]).drop(columns=["order"])
    return merged.reset_index(drop=True)


def case_name(row) -> str:
    """method · mask · mode · b, heads, lengths, head dim, dtype [· layout × world size]."""
    text = (f"{row['method']} · {row['mask']} · {row['mode']} · b{row['batch']} h{row['heads_q']}/{row['heads_kv']} "
            f"q{row['seq_q']} kv{row['seq_kv']} d{row['head_dim']} {row['dtype']}")
    if _text(row["layout"]) not in ("", "single"):
        text += f" · {row['layout']}×{row['world_size']}"
    return text


def _ms(value) -> str:
    return "" if pd.isna(value) else f"{value:.4g}"


def _text(value) -> str:
    return "" if value is None or pd.isna(value) else str(value)


def summary(result: pd.DataFrame, threshold: float) -> dict:
    """Counts per verdict, the number of cases compared on time, and their geometric-mean ratio."""
    ratios = result["ratio"].dropna()
    ratios = ratios[ratios > 0]
    return {
        "threshold": threshold,
        "compared": int(len(ratios)),
        "geomean_ratio": float(np.exp(np.log(ratios).mean())) if len(ratios) else None,
        "counts": {v: int((result["verdict"] == v).sum()) for v in VERDICTS},
        "regressions": int(result["verdict"].isin(REGRESSIONS).sum()),
    }


def format_lines(result: pd.DataFrame, limit: int) -> list[str]:
    """One line per case, worst first, at most ``limit`` (0: all)."""
    shown = result if limit == 0 else result.head(limit)
    lines = [f"{'verdict':<14} {'ratio':>7} {'BASE ms':>10} {'NEW ms':>10}  case"]
    for _, row in shown.iterrows():
        ratio = "" if pd.isna(row["ratio"]) else f"{row['ratio']:.3f}"
        status = "" if row["verdict"] in ("regression", "improvement", "within spread", "unchanged") else \
            f"  [{_text(row['status_base']) or '-'} → {_text(row['status_new']) or '-'}]"
        lines.append(f"{row['verdict']:<14} {ratio:>7} {_ms(row['ms_median_base']):>10} {_ms(row['ms_median_new']):>10}"
                     f"  {case_name(row)}{status}")
    if len(result) > len(shown):
        lines.append(f"... {len(result) - len(shown)} more cases in compare.csv")
    return lines


def summary_lines(stats: dict, base_name: str, new_name: str) -> list[str]:
    geomean = "n/a" if stats["geomean_ratio"] is None else f"{stats['geomean_ratio']:.3f}"
    counts = ", ".join(f"{v}: {n}" for v, n in stats["counts"].items() if n)
    return [f"BASE {base_name}  vs  NEW {new_name}  (threshold {stats['threshold']:.1%}, regression also needs "
            f"NEW p20 > BASE p80)",
            f"{stats['compared']} cases timed in both; geometric-mean ratio NEW/BASE {geomean}",
            f"{counts or 'no cases'}",
            f"regressions: {stats['regressions']}"]


def write_outputs(result: pd.DataFrame, lines: list[str], out_dir: Path) -> tuple[Path, Path]:
    """compare.csv (every case) and compare.md (summary and every case) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, markdown = out_dir / "compare.csv", out_dir / "compare.md"
    result.to_csv(csv, index=False)
    table = ["| verdict | ratio NEW/BASE | BASE ms | NEW ms | BASE status | NEW status | case |",
             "|---|---|---|---|---|---|---|"]
    for _, row in result.iterrows():
        ratio = "" if pd.isna(row["ratio"]) else f"{row['ratio']:.3f}"
        table.append(f"| {row['verdict']} | {ratio} | {_ms(row['ms_median_base'])} | {_ms(row['ms_median_new'])} | "
                     f"{_text(row['status_base'])} | {_text(row['status_new'])} | {case_name(row)} |")
    markdown.write_text("# attnbench compare\n\n" + "\n\n".join(lines) + "\n\n" + "\n".join(table) + "\n")
    return csv, markdown


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="attnbench compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", metavar="BASE", help="run folder (or run id under --results-dir) to compare against")
    parser.add_argument("new", metavar="NEW", help="run folder (or run id) to judge")
    parser.add_argument("--threshold", type=parse_threshold, default=0.05, metavar="PCT",
                        help="smallest slow-down that counts, e.g. 5%% (default) or 0.05")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when any case regressed")
    parser.add_argument("--out", type=Path, help="folder for compare.csv and compare.md (default: the NEW run)")
    parser.add_argument("--limit", type=int, default=40, help="cases printed, worst first (0: all; files hold all)")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="where run ids are looked up")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    try:
        base, new = load_runs([args.base, args.new], args.results_dir, ["BASE", "NEW"])
        for name, run in (("BASE", base), ("NEW", new)):
            if not len(run.rows):
                raise UsageError(f"{name} {run.path}: no rows")
    except UsageError as exc:
        print(f"attnbench compare: error: {exc}", file=sys.stderr)
        return 2
    result = compare_rows(base.rows, new.rows, args.threshold)
    stats = summary(result, args.threshold)
    lines = summary_lines(stats, f"{base.name} ({base.device})", f"{new.name} ({new.device})")
    if base.device != new.device:
        lines.append(f"note: different devices ({base.device} vs {new.device}): ratios compare machines, not code")
    print("\n".join(format_lines(result, max(args.limit, 0))))
    print()
    print("\n".join(lines))
    csv, markdown = write_outputs(result, lines, args.out or new.path)
    print(f"wrote {csv}\nwrote {markdown}")
    return 1 if args.fail_on_regression and stats["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
