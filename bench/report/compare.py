"""`attnbench compare BASE NEW`: time ratio NEW / BASE per case, a summary, and a regression verdict for CI.

Cases match on ``bench.schema.KEY_FIELDS`` (method, mask, shape, length, dtype, mode, layout, seed), never on the
device, so two machines or two commits can be compared. For a case measured (status ok) in both runs:

- where both rows kept their repetition times (``ms_samples``, at least ``MIN_SAMPLES`` each), a two-sided
  Mann–Whitney U test (``mann_whitney``: exact for small samples without ties, else the normal approximation
  with tie and continuity corrections) gives ``p_value``: **regression** when NEW is slower by more than the
  threshold (ratio > 1 + threshold) *and* p < alpha; **improvement** when ratio < 1 - threshold and p < alpha;
  **not significant** when the ratio passes the threshold but p >= alpha;
- otherwise (older rows without samples) the recorded spread decides: **regression** when ratio > 1 + threshold
  and NEW's p20 is above BASE's p80 (the p20–p80 intervals do not overlap), **improvement** symmetrically,
  **within spread** when the ratio passes the threshold but the intervals overlap;
- **unchanged** when the ratio is within the threshold (**not timed** if a side has no median time).

Repetitions of one run are not independent (clocks drift, caches warm), so p is a guide, not a guarantee; a
row flagged ``cpu_interference`` on either side is counted in the summary, since its time includes another
process's.

Quality rows (``quality.parquet``, from ``attnbench train``) are compared too when both runs hold them, per
(task, method, length, seed): the metric difference with its direction and a regression verdict against
``--quality-threshold`` (``attnbench.report.compare_quality``), written to compare_quality.csv and a section of
compare.md.

A case ok in BASE and failed in NEW is a regression too (``ok → oom`` ...); failed → ok is ``fixed``. Cases in one
run only are listed, never called regressions. ``--fail-on-regression`` exits 1 when any regression is found.
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from attnbench.record.rundir import UsageError, load_runs, parse_args
from attnbench.measure.timing import parse_samples
from attnbench.record.schema import KEY_FIELDS

VERDICTS = ("regression", "new failure", "improvement", "fixed", "within spread", "not significant", "unchanged",
            "not timed", "still failing", "only in BASE", "only in NEW")
REGRESSIONS = ("regression", "new failure")
MIN_SAMPLES = 3  # fewer repetitions on a side: the spread rule decides
EXACT_MAX = 50  # n1 + n2 up to which the U test is exact (when no value is tied)
DEFAULT_ALPHA = 0.01


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


@lru_cache(maxsize=64)
def _u_counts(n1: int, n2: int) -> tuple:
    """How many of the C(n1 + n2, n1) orderings give each U = 0 .. n1 * n2 (no ties)."""
    # table[j][u]: orderings of i x-values and j y-values with U = u, built up over i
    table = [np.zeros(n1 * n2 + 1, dtype=np.int64) for _ in range(n2 + 1)]
    for j in range(n2 + 1):
        table[j][0] = 1  # no x values: U = 0
    for i in range(1, n1 + 1):
        new = [np.zeros(n1 * n2 + 1, dtype=np.int64) for _ in range(n2 + 1)]
        new[0][0] = 1
        for j in range(1, n2 + 1):
            # the largest value is an x (beats all j y-values: U grows by j) or a y (U unchanged)
            shifted = np.zeros_like(table[j])
            shifted[j:] = table[j][: len(table[j]) - j]
            new[j] = shifted + new[j - 1]
        table = new
    return tuple(int(c) for c in table[n2])


def mann_whitney(x, y) -> tuple[float, float]:
    """(U of x, two-sided p) of the Mann–Whitney U test that x and y come from one distribution.

    Exact (the U distribution counted over every ordering) when nothing is tied and n1 + n2 <= ``EXACT_MAX``;
    otherwise the normal approximation with the tie-corrected variance and a continuity correction."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney needs at least one value on each side")
    combined = np.concatenate([x, y])
    u1 = float(_midranks(combined)[:n1].sum() - n1 * (n1 + 1) / 2.0)
    n = n1 + n2
    _, ties = np.unique(combined, return_counts=True)
    if len(ties) == n and n <= EXACT_MAX:
        counts = np.array(_u_counts(n1, n2), dtype=float)
        tail = counts[: int(round(min(u1, n1 * n2 - u1))) + 1].sum()
        return u1, float(min(1.0, 2.0 * tail / counts.sum()))
    variance = n1 * n2 / 12.0 * ((n + 1) - float((ties**3 - ties).sum()) / (n * (n - 1)))
    if variance <= 0:
        return u1, 1.0  # every value equal
    z = max(abs(u1 - n1 * n2 / 2.0) - 0.5, 0.0) / math.sqrt(variance)
    return u1, float(math.erfc(z / math.sqrt(2.0)))


def significance(base_samples, new_samples) -> float:
    """Two-sided Mann–Whitney p of two rows' ``ms_samples`` (text or lists); NaN when a side has fewer than
    ``MIN_SAMPLES`` values."""
    base = parse_samples(base_samples) if isinstance(base_samples, str) or base_samples is None else list(base_samples)
    new = parse_samples(new_samples) if isinstance(new_samples, str) or new_samples is None else list(new_samples)
    if len(base) < MIN_SAMPLES or len(new) < MIN_SAMPLES:
        return math.nan
    return mann_whitney(new, base)[1]


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


def verdict(row, threshold: float, alpha: float = DEFAULT_ALPHA) -> str:
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
    p_value = row.get("p_value", math.nan)
    if p_value is not None and not pd.isna(p_value):
        if ratio > 1 + threshold:
            return "regression" if p_value < alpha else "not significant"
        if ratio < 1 - threshold:
            return "improvement" if p_value < alpha else "not significant"
        return "unchanged"
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


def compare_rows(base: pd.DataFrame, new: pd.DataFrame, threshold: float, alpha: float = DEFAULT_ALPHA) -> pd.DataFrame:
    """One row per case in either run: key fields, each side's status, reason, times, samples and flags
    (suffixes _base, _new), ``ratio`` (NEW / BASE median time), ``p_value`` (Mann–Whitney, NaN without
    samples), ``mem_ratio`` and ``verdict``; regressions first, then worst ratio first."""
    measured = ["status", "reason", "ms_median", "ms_p20", "ms_p80", "peak_mem_mb", "ms_samples", "flags"]
    base, new = (rows if all(c in rows for c in measured) else _with_columns(rows, measured) for rows in (base, new))
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
    merged["p_value"] = [significance(b, n) if ok else math.nan
                         for b, n, ok in zip(merged["ms_samples_base"], merged["ms_samples_new"], both)]
    merged["verdict"] = [verdict(row, threshold, alpha) for _, row in merged.iterrows()]
    merged["order"] = merged["verdict"].map({v: i for i, v in enumerate(VERDICTS)})
    merged = merged.sort_values(["order", "ratio"], ascending=[True, False]).drop(columns=["order"])
    return merged.reset_index(drop=True)


def _with_columns(rows: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    rows = rows.copy()
    for column in columns:
        if column not in rows:
            rows[column] = None
    return rows


def interfered(result: pd.DataFrame) -> pd.Series:
    """Cases whose row on either side carries a cpu_interference flag."""
    return (result["flags_base"].fillna("").astype(str).str.contains("cpu_interference")
            | result["flags_new"].fillna("").astype(str).str.contains("cpu_interference"))


def case_name(row) -> str:
    """method · mask · mode · b, heads, lengths, head dim, dtype [· layout × world size]."""
    text = (f"{row['method']} · {row['mask']} · {row['mode']} · b{row['batch']} h{row['heads_q']}/{row['heads_kv']} "
            f"q{row['seq_q']} kv{row['seq_kv']} d{row['head_dim']} {row['dtype']}")
    if _text(row["layout"]) not in ("", "single"):
        text += f" · {row['layout']}×{row['world_size']}"
    return text


def _p(value) -> str:
    """A p-value for display: empty when not tested, '<1e-4' below that."""
    if value is None or pd.isna(value):
        return ""
    return "<1e-4" if value < 1e-4 else f"{value:.4f}"


def _ms(value) -> str:
    return "" if pd.isna(value) else f"{value:.4g}"


def _text(value) -> str:
    return "" if value is None or pd.isna(value) else str(value)


def summary(result: pd.DataFrame, threshold: float, alpha: float = DEFAULT_ALPHA) -> dict:
    """Counts per verdict, the number of cases compared on time (and on samples), their geometric-mean ratio,
    and the cases flagged cpu_interference on either side."""
    ratios = result["ratio"].dropna()
    ratios = ratios[ratios > 0]
    return {
        "threshold": threshold,
        "alpha": alpha,
        "tested": int(result["p_value"].notna().sum()),
        "interfered": int(interfered(result).sum()),
        "compared": int(len(ratios)),
        "geomean_ratio": float(np.exp(np.log(ratios).mean())) if len(ratios) else None,
        "counts": {v: int((result["verdict"] == v).sum()) for v in VERDICTS},
        "regressions": int(result["verdict"].isin(REGRESSIONS).sum()),
    }


def format_lines(result: pd.DataFrame, limit: int) -> list[str]:
    """One line per case, worst first, at most ``limit`` (0: all)."""
    shown = result if limit == 0 else result.head(limit)
    lines = [f"{'verdict':<15} {'ratio':>7} {'p':>8} {'BASE ms':>10} {'NEW ms':>10}  case"]
    for _, row in shown.iterrows():
        ratio = "" if pd.isna(row["ratio"]) else f"{row['ratio']:.3f}"
        status = "" if row["verdict"] in ("regression", "improvement", "within spread", "not significant",
                                          "unchanged") else \
            f"  [{_text(row['status_base']) or '-'} → {_text(row['status_new']) or '-'}]"
        lines.append(f"{row['verdict']:<15} {ratio:>7} {_p(row['p_value']):>8} {_ms(row['ms_median_base']):>10} "
                     f"{_ms(row['ms_median_new']):>10}  {case_name(row)}{status}")
    if len(result) > len(shown):
        lines.append(f"... {len(result) - len(shown)} more cases in compare.csv")
    return lines


def summary_lines(stats: dict, base_name: str, new_name: str) -> list[str]:
    geomean = "n/a" if stats["geomean_ratio"] is None else f"{stats['geomean_ratio']:.3f}"
    counts = ", ".join(f"{v}: {n}" for v, n in stats["counts"].items() if n)
    lines = [f"BASE {base_name}  vs  NEW {new_name}  (threshold {stats['threshold']:.1%}; a regression also needs "
             f"Mann-Whitney p < {stats['alpha']:g} on the repetition times, or NEW p20 > BASE p80 where a row has "
             f"no samples)",
             f"{stats['compared']} cases timed in both ({stats['tested']} tested on their samples); geometric-mean "
             f"ratio NEW/BASE {geomean}",
             f"{counts or 'no cases'}",
             f"regressions: {stats['regressions']}"]
    if stats["interfered"]:
        lines.append(f"{stats['interfered']} cases flagged cpu_interference on a side: their times include another "
                     f"process's")
    return lines


def write_outputs(result: pd.DataFrame, lines: list[str], out_dir: Path) -> tuple[Path, Path]:
    """compare.csv (every case) and compare.md (summary and every case) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, markdown = out_dir / "compare.csv", out_dir / "compare.md"
    result.to_csv(csv, index=False)
    table = ["| verdict | ratio NEW/BASE | p (Mann-Whitney) | BASE ms | NEW ms | BASE status | NEW status | case |",
             "|---|---|---|---|---|---|---|---|"]
    for _, row in result.iterrows():
        ratio = "" if pd.isna(row["ratio"]) else f"{row['ratio']:.3f}"
        table.append(f"| {row['verdict']} | {ratio} | {_p(row['p_value'])} | {_ms(row['ms_median_base'])} | "
                     f"{_ms(row['ms_median_new'])} | "
                     f"{_text(row['status_base'])} | {_text(row['status_new'])} | {case_name(row)} |")
    markdown.write_text("# attnbench compare\n\n" + "\n\n".join(lines) + "\n\n" + "\n".join(table) + "\n")
    return csv, markdown


def _quality_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def main(argv: list[str]) -> int:
    from attnbench.record.quality import load_quality
    from attnbench.report import compare_quality as cq

    parser = argparse.ArgumentParser(prog="attnbench compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", metavar="BASE", help="run folder (or run id under --results-dir) to compare against")
    parser.add_argument("new", metavar="NEW", help="run folder (or run id) to judge")
    parser.add_argument("--threshold", type=parse_threshold, default=0.05, metavar="PCT",
                        help="smallest slow-down that counts, e.g. 5%% (default) or 0.05")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, metavar="P",
                        help="significance level of the Mann-Whitney test (default 0.01)")
    parser.add_argument("--quality-threshold", type=_quality_threshold, default=cq.DEFAULT_QUALITY_THRESHOLD,
                        metavar="X", help="quality rows: smallest loss of the task metric, in its own unit, that "
                                          f"counts as a regression (default {cq.DEFAULT_QUALITY_THRESHOLD:g})")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when any case regressed")
    parser.add_argument("--out", type=Path, help="folder for compare.csv and compare.md (default: the NEW run)")
    parser.add_argument("--limit", type=int, default=40, help="cases printed, worst first (0: all; files hold all)")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="where run ids are looked up")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    try:
        base, new = load_runs([args.base, args.new], args.results_dir, ["BASE", "NEW"])
        quality = {"BASE": load_quality(base.path), "NEW": load_quality(new.path)}
        kernel_both = len(base.rows) > 0 and len(new.rows) > 0
        quality_both = len(quality["BASE"]) > 0 and len(quality["NEW"]) > 0
        if not kernel_both and not quality_both:
            for name, run in (("BASE", base), ("NEW", new)):
                if not len(run.rows) and not len(quality[name]):
                    raise UsageError(f"{name} {run.path}: no rows")
            raise UsageError(f"BASE {base.path} and NEW {new.path}: nothing to compare (one holds kernel rows "
                             f"only, the other quality rows only)")
    except UsageError as exc:
        print(f"attnbench compare: error: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.alpha < 1:
        print(f"attnbench compare: error: --alpha {args.alpha} must be between 0 and 1", file=sys.stderr)
        return 2
    out_dir = args.out or new.path
    regressions = 0
    lines: list[str] = []
    if kernel_both:
        result = compare_rows(base.rows, new.rows, args.threshold, args.alpha)
        stats = summary(result, args.threshold, args.alpha)
        regressions += stats["regressions"]
        lines = summary_lines(stats, f"{base.name} ({base.device})", f"{new.name} ({new.device})")
        if base.device != new.device:
            lines.append(f"note: different devices ({base.device} vs {new.device}): ratios compare machines, not code")
        print("\n".join(format_lines(result, max(args.limit, 0))))
        print()
        print("\n".join(lines))
        csv, markdown = write_outputs(result, lines, out_dir)
        print(f"wrote {csv}\nwrote {markdown}")
    if quality_both:
        result = cq.compare_quality(quality["BASE"], quality["NEW"], args.quality_threshold)
        stats = cq.quality_summary(result, args.quality_threshold)
        regressions += stats["regressions"]
        text = cq.quality_lines(result, stats, max(args.limit, 0))
        if lines:
            print()
        print("\n".join(text))
        out_dir.mkdir(parents=True, exist_ok=True)
        csv, markdown = out_dir / "compare_quality.csv", out_dir / "compare.md"
        result.to_csv(csv, index=False)
        head = markdown.read_text() if kernel_both else \
            f"# attnbench compare\n\nBASE {base.name}  vs  NEW {new.name}\n"
        markdown.write_text(head + "\n## Quality rows\n\n" + "\n\n".join(text[:2]) + "\n\n"
                            + cq.quality_markdown(result) + "\n")
        print(f"wrote {csv}\nwrote {markdown}")
    return 1 if args.fail_on_regression and regressions else 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
