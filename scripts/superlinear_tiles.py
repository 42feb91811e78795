#!/usr/bin/env python3
"""How many pairs superlinear's FlexAttention path computes for the pairs it attends (issue 9's rate target):
per length, the pairs the method attends (``span_pairs``: every span's keys, the window once per span) against
the pairs in the 128 x 128 tiles its BlockMasks list (``ranges_to_blocks``: per query block, the union of its
queries' ranges, per span index), in the position order (``query_order: natural``) and in the order of each
span's start (``query_order: sorted``, column ``sorted_computed_over_attended``), on the benchmark's kind of
inputs (q1, k standard normal, fp32 here, seeded), with the method's defaults (3 spans, p = 1/2, backward
factor 2, sigma 1/2, no window). CPU only, no kernel is run: the routing is :func:`superlinear.search` and the
tiles are exactly the flags the fast path builds.

usage: python scripts/superlinear_tiles.py [--lengths 4096,16384,65536,262144] [--heads 2] [--seed 0] [--out DIR]
Writes DIR/tiles.csv and DIR/tiles.md (DIR: results/cpu-superlinear-tiles) and prints the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from attnbench.methods.sparse import superlinear as sl

BLOCK = sl.FLEX_BLOCK  # FlexAttention's tile


def tiles(length: int, heads: int, seed: int, dim: int = 128, num_spans: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q1 = torch.randn(1, heads, length, dim, generator=gen)
    k = torch.randn(1, heads, length, dim, generator=gen)
    distances = sl.stripe_distances(length, 0.5, 0)
    window = sl.window_size(0.5, 0)
    started = time.perf_counter()
    anchors = sl.search(q1, k, distances, num_spans)
    start, end, sw_start = sl.span_bounds(anchors, window, 2.0, 0.0, 0.5)
    attended = sl.span_pairs(start, end, sw_start, 1, heads, num_spans)
    t = torch.arange(length)
    listed = listed_sorted = 0
    for j in range(num_spans):  # the fast path's own flags, per query order (superlinear.span_block_flags)
        listed += int(sl.span_block_flags(start[..., j], end[..., j], sw_start, t, length, "natural")[0].sum())
        listed_sorted += int(sl.span_block_flags(start[..., j], end[..., j], sw_start, t, length, "sorted")[0].sum())
    q_blocks = -(-length // BLOCK)
    causal_blocks = q_blocks * (q_blocks + 1) // 2 * heads * num_spans  # every causal tile, per span index
    computed = listed * BLOCK * BLOCK
    return {"length": length, "heads": heads, "seed": seed, "spans": num_spans,
            "attended_per_query": attended / (heads * length),
            "computed_per_query": computed / (heads * length),
            "computed_over_attended": computed / attended,
            "sorted_computed_over_attended": listed_sorted * BLOCK * BLOCK / attended,
            "tiles_listed_of_causal": listed / causal_blocks,
            "causal_per_query": (length + 1) / 2,
            "cpu_s": round(time.perf_counter() - started, 1)}


def markdown(frame: pd.DataFrame) -> str:
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,65536,262144")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [tiles(int(n), args.heads, args.seed) for n in args.lengths.split(",")]
    frame = pd.DataFrame(rows)
    table = markdown(frame)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out / "tiles.csv", index=False)
        command = "python scripts/superlinear_tiles.py " + " ".join(argv if argv is not None else sys.argv[1:])
        (args.out / "tiles.md").write_text(f"<!-- {command.strip()} -->\n{__doc__.splitlines()[0]}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
