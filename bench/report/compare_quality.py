"""Quality rows in `attnbench compare`: per (task, method, seq, seed) the metric difference NEW - BASE.

Rows match on ``QUALITY_KEY`` (task, method, seq, seed, and kind so a probe never matches a trained run). The
difference is absolute, in the metric's own unit (accuracy, bpc, recall, approx_err), signed so that a positive
``gain`` is better whatever the metric's direction (``higher_is_better``). Verdicts, for a case ok in both runs:
**regression** when the gain is below ``-threshold``, **improvement** above ``threshold``, **unchanged** within;
**metric changed** when the two rows measure different metrics or directions (nothing compared). As for kernel
rows: ok → failed is a **new failure** (a regression too), failed → ok **fixed**, failed in both **still
failing**, a case in one run only **only in BASE** / **only in NEW** (never a regression).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

QUALITY_KEY = ("task", "method", "seq", "seed", "kind")
QUALITY_VERDICTS = ("regression", "new failure", "metric changed", "improvement", "fixed", "unchanged",
                    "still failing", "only in BASE", "only in NEW")
QUALITY_REGRESSIONS = ("regression", "new failure")
DEFAULT_QUALITY_THRESHOLD = 0.01
MEASURED = ("status", "reason", "metric", "higher_is_better", "value")


def _key(rows: pd.DataFrame) -> pd.Series:
    key = pd.Series("", index=rows.index, dtype=object)
    for field in QUALITY_KEY:
        key = key + "|" + rows[field].astype("string").fillna("").astype(str)
    return key


def _text(value) -> str:
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def quality_verdict(row, threshold: float) -> str:
    base, new = _text(row["status_base"]), _text(row["status_new"])
    if not base:
        return "only in NEW"
    if not new:
        return "only in BASE"
    if base == "ok" and new != "ok":
        return "new failure"
    if new == "ok" and base != "ok":
        return "fixed"
    if base != "ok":
        return "still failing"
    if (_text(row["metric_base"]) != _text(row["metric_new"])
            or _text(row["higher_is_better_base"]) != _text(row["higher_is_better_new"])):
        return "metric changed"
    gain = row["gain"]
    if not math.isfinite(gain):
        return "metric changed"  # ok rows always carry a value; a missing one is not comparable
    if gain < -threshold:
        return "regression"
    if gain > threshold:
        return "improvement"
    return "unchanged"


def compare_quality(base: pd.DataFrame, new: pd.DataFrame, threshold: float = DEFAULT_QUALITY_THRESHOLD
                    ) -> pd.DataFrame:
    """One row per quality case in either run: the key fields, each side's status, reason, metric, direction
    and value (suffixes _base, _new), ``diff`` (NEW - BASE), ``gain`` (diff, negated when lower is better) and
    ``verdict``; regressions first, then the largest loss first."""
    if threshold < 0 or not math.isfinite(threshold):
        raise ValueError(f"quality threshold {threshold!r} must be a finite number >= 0")
    sides = []
    for rows in (base, new):
        side = rows[[*QUALITY_KEY, *MEASURED]].astype(object)
        side = side.where(side.notna(), None)
        sides.append(side.set_index(_key(rows)).loc[lambda f: ~f.index.duplicated(keep="last")])
    keys = sides[0].index.union(sides[1].index, sort=False)
    fields = sides[0][list(QUALITY_KEY)].reindex(keys).combine_first(sides[1][list(QUALITY_KEY)].reindex(keys))
    merged = pd.concat([fields[list(QUALITY_KEY)], sides[0][list(MEASURED)].reindex(keys).add_suffix("_base"),
                        sides[1][list(MEASURED)].reindex(keys).add_suffix("_new")], axis=1)
    for side in ("base", "new"):
        merged[f"value_{side}"] = pd.to_numeric(merged[f"value_{side}"], errors="coerce").astype(float)
    both = (merged["status_base"] == "ok") & (merged["status_new"] == "ok")
    merged["diff"] = np.where(both, merged["value_new"] - merged["value_base"], np.nan)
    higher = merged["higher_is_better_new"].map(lambda v: v is None or bool(v))
    merged["gain"] = np.where(higher, merged["diff"], -merged["diff"]).astype(float)
    merged["verdict"] = [quality_verdict(row, threshold) for _, row in merged.iterrows()] if len(merged) else []
    merged["order"] = merged["verdict"].map({v: i for i, v in enumerate(QUALITY_VERDICTS)})
    merged = merged.sort_values(["order", "gain"], ascending=[True, True]).drop(columns=["order"])
    return merged.reset_index(drop=True)


def quality_summary(result: pd.DataFrame, threshold: float) -> dict:
    return {"threshold": threshold, "compared": int(result["gain"].notna().sum()),
            "counts": {v: int((result["verdict"] == v).sum()) for v in QUALITY_VERDICTS},
            "regressions": int(result["verdict"].isin(QUALITY_REGRESSIONS).sum())}


def _number(value) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.4g}"


def quality_case(row) -> str:
    direction = {True: " ↑", False: " ↓"}.get(
        None if row["higher_is_better_new"] is None else bool(row["higher_is_better_new"]), "")
    metric = _text(row["metric_new"]) or _text(row["metric_base"])
    return f"{row['task']} · {row['method']} · seq {row['seq']} · seed {row['seed']} · {metric}{direction}"


def quality_lines(result: pd.DataFrame, stats: dict, limit: int) -> list[str]:
    """The summary, then one line per case, worst first, at most ``limit`` (0: all)."""
    counts = ", ".join(f"{v}: {n}" for v, n in stats["counts"].items() if n)
    lines = [f"quality rows: {stats['compared']} cases measured in both (threshold {stats['threshold']:g} in the "
             f"metric's unit, signed by its direction); {counts or 'no cases'}",
             f"quality regressions: {stats['regressions']}",
             f"{'verdict':<15} {'gain':>8} {'BASE':>8} {'NEW':>8}  case"]
    shown = result if limit == 0 else result.head(limit)
    for _, row in shown.iterrows():
        status = "" if row["verdict"] in ("regression", "improvement", "unchanged") else \
            f"  [{_text(row['status_base']) or '-'} → {_text(row['status_new']) or '-'}]"
        gain = "" if pd.isna(row["gain"]) else f"{row['gain']:+.4g}"
        lines.append(f"{row['verdict']:<15} {gain:>8} {_number(row['value_base']):>8} {_number(row['value_new']):>8}"
                     f"  {quality_case(row)}{status}")
    if len(result) > len(shown):
        lines.append(f"... {len(result) - len(shown)} more cases in compare_quality.csv")
    return lines


def quality_markdown(result: pd.DataFrame) -> str:
    table = ["| verdict | gain | NEW - BASE | BASE | NEW | BASE status | NEW status | case |",
             "|---|---|---|---|---|---|---|---|"]
    for _, row in result.iterrows():
        gain = "" if pd.isna(row["gain"]) else f"{row['gain']:+.4g}"
        diff = "" if pd.isna(row["diff"]) else f"{row['diff']:+.4g}"
        table.append(f"| {row['verdict']} | {gain} | {diff} | {_number(row['value_base'])} | "
                     f"{_number(row['value_new'])} | {_text(row['status_base'])} | {_text(row['status_new'])} | "
                     f"{quality_case(row)} |")
    return "\n".join(table)
