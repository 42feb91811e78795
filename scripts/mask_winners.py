"""Print the per-mask winners table of results/README.md from the committed mask runs.

usage: python scripts/mask_winners.py [SEQ]   (default 65536; runs: results/h200-masks-{a,b})
"""
from __future__ import annotations

import sys

import pandas as pd

RUNS = ("results/h200-masks-a", "results/h200-masks-b")


def winners(rows: pd.DataFrame, seq: int) -> list[str]:
    ok = rows[(rows["status"] == "ok") & (rows["seq_q"] == seq) & rows["exact"]]
    lines = ["| mask | density | fwd: winner, ms, TFLOP/s | margin | fwd_bwd: winner, ms, TFLOP/s | margin |",
             "|---|---|---|---|---|---|"]
    for mask, group in ok.groupby("mask", sort=False):
        cells = []
        for mode in ("fwd", "fwd_bwd"):
            ranked = group[group["mode"] == mode].sort_values("ms_median")
            if ranked.empty:
                cells += ["not measured", ""]
                continue
            first = ranked.iloc[0]
            cells.append(f"{first['method']}, {first['ms_median']:.1f} ms, {first['tflops']:.0f}")
            if len(ranked) > 1:
                second = ranked.iloc[1]
                cells.append(f"{second['ms_median'] / first['ms_median']:.2f}× over {second['method']}")
            else:
                cells.append("only one")
        lines.append(f"| `{mask}` | {group['density'].iloc[0]:.3f} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    seq = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    rows = pd.concat([pd.read_parquet(f"{run}/rows.parquet") for run in RUNS])
    print("\n".join(winners(rows, seq)))
