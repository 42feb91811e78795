"""The console summary printed at the end of a sweep."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def summary_text(frame: pd.DataFrame, max_rows: int = 60) -> str:
    lines = []
    counts = frame["status"].value_counts()
    lines.append("cases: " + ", ".join(f"{status} {int(n)}" for status, n in counts.items()) + f" (total {len(frame)})")
    ok = frame[frame["status"] == "ok"]
    if len(ok):
        shape = ok["seq_q"].astype(str) + "x" + ok["seq_kv"].astype(str)
        heads = ok["heads_q"].astype(str) + "/" + ok["heads_kv"].astype(str)
        table = ok.assign(shape=shape, heads=heads, batch=ok["batch"]).pivot_table(
            index=["mask", "mode", "head_dim", "heads", "batch", "shape"], columns="method", values="ms_median", aggfunc="median"
        )
        lines.append("median ms per call (ok cases):")
        lines.append(table.round(4).head(max_rows).to_string(na_rep="-"))
        if len(table) > max_rows:
            lines.append(f"... {len(table) - max_rows} more rows in rows.csv")
    failed = frame[~frame["status"].isin(["ok", "unsupported"])]
    if len(failed):
        lines.append("not ok (first 20):")
        for _, row in failed.head(20).iterrows():
            lines.append(f"  {row['status']:8s} {row['method']} {row['mask']} {row['seq_q']}x{row['seq_kv']} "
                         f"{row['mode']}: {str(row['reason'])[:160]}")
    return "\n".join(lines)


def print_summary(run_dir: Path) -> None:
    frame = pd.read_parquet(Path(run_dir) / "rows.parquet")
    print(f"run folder: {run_dir}")
    print(summary_text(frame))
