"""Print the per-mask winners table of results/README.md from committed mask runs.

usage: python scripts/mask_winners.py [--seq N] [RUN ...]   (default 65536; run: results/h200-masks-v3)

Per mask and mode: the fastest exact method (median over median), its margin over the next one, and its margin
over sdpa_cudnn given the mask as a dense additive bias built outside the timed call (the dense-mask baseline in
its fastest form; on `full` and `causal` cuDNN needs no mask).
"""
from __future__ import annotations

import argparse

import pandas as pd

RUNS = ("results/h200-masks-v3",)


def winners(rows: pd.DataFrame, seq: int) -> list[str]:
    ok = rows[(rows["status"] == "ok") & (rows["seq_q"] == seq) & rows["exact"].astype(bool)]
    lines = ["| mask | density | fwd: winner, ms, TFLOP/s | margin | vs cuDNN | fwd_bwd: winner, ms, TFLOP/s | margin "
             "| vs cuDNN |", "|---|---|---|---|---|---|---|---|"]
    for mask, group in ok.groupby("mask", sort=False):
        cells = []
        for mode in ("fwd", "fwd_bwd"):
            ranked = group[group["mode"] == mode].sort_values("ms_median")
            if ranked.empty:
                cells += ["not measured", "", ""]
                continue
            first = ranked.iloc[0]
            cells.append(f"{first['method']}, {first['ms_median']:.1f} ms, {first['tflops']:.0f}")
            if len(ranked) > 1:
                second = ranked.iloc[1]
                cells.append(f"{second['ms_median'] / first['ms_median']:.2f}× over {second['method']}")
            else:
                cells.append("only one")
            cudnn = ranked[ranked["method"] == "sdpa_cudnn"]
            if cudnn.empty:
                cells.append("no cuDNN row")
            elif first["method"] == "sdpa_cudnn":
                cells.append("—")
            else:
                cells.append(f"{cudnn['ms_median'].iloc[0] / first['ms_median']:.2f}×")
        lines.append(f"| `{mask}` | {group['density'].iloc[0]:.3f} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("runs", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    rows = pd.concat([pd.read_parquet(f"{run}/rows.parquet") for run in args.runs])
    print("\n".join(winners(rows, args.seq)))
