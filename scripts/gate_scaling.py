"""CPU scaling of the correctness gate's pieces at long lengths (notes: /work/notes/longgate.md).

For one method/mask and a list of lengths, times on the CPU (batch 1, few heads) what the case runner does
around the method: the exact sampled-rows reference (``CaseRunner.reference``), the method's own reference on
the sampled rows (``CaseRunner._own_reference``), and, with ``--leak``, the leak probe (which calls the fast
path three times). ``--h200-heads`` scales the references' memory budgets down by ``h200_heads * scale /
heads`` so the number of row (or key) chunks at CPU length L is the H200's at ``scale * L`` with
``h200_heads`` heads (budgets are per-chunk sizes: chunk counts, and so how often K and V are re-read,
depend on heads x length / budget). Prints one line per length: CPU seconds per piece (process time, one
thread by default: wall time on a shared machine measures the neighbours too).

    .venv/bin/python scripts/gate_scaling.py halo full 8192,16384,32768 --opts '{"block":256,"halo":128}'
"""
from __future__ import annotations

import argparse
import json
import time

clock = time.process_time

import torch

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute.case import CaseRunner
from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared
from attnbench.methods.sparse import common


def _budgeted(scale_down: float):
    """Scale the sparse references' element budget (``common.REF_BUDGET_ELEMS`` where present, else the
    ``row_chunks`` default) down by ``scale_down``."""
    if hasattr(common, "REF_BUDGET_ELEMS"):
        common.REF_BUDGET_ELEMS = max(1, int(common.REF_BUDGET_ELEMS / scale_down))
        return
    original = common.row_chunks

    def row_chunks(rows, per_row_elems, budget_elems=1 << 27):
        return original(rows, per_row_elems, max(1, int(budget_elems / scale_down)))

    import sys

    for name, module in list(sys.modules.items()):
        if name.startswith("attnbench.methods.sparse") and getattr(module, "row_chunks", None) is original:
            module.row_chunks = row_chunks


def measure(method: str, mask: str, seq: int, heads: int, dim: int, opts: dict, chunk_bytes: int,
            leak: bool, mode: str = "fwd") -> dict:
    spec = masks.make_mask(mask)
    options = {"timing": {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False},
               "ref_full_pairs": 1 << 24, "ref_chunk_bytes": chunk_bytes, "method_options": {method: opts}}
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=heads, heads_kv=heads,
                seq_q=seq, seq_kv=seq, head_dim=dim, dtype="bfloat16", mode=mode, seed=0)
    runner = CaseRunner("cpu", options)
    bound = spec.bind(seq, seq)
    entry = METHODS[method]
    caps = entry.caps
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                       dtype=torch.bfloat16, options=options, params=dict(opts))
    saved = common.ATTEND
    common.ATTEND = common.dense_attend  # builds without compiled FlexAttention (its fast path is not timed here)
    try:
        prepared = as_prepared(entry.build(ctx))
    finally:
        common.ATTEND = saved
    call = runner._call(case, caps, prepared, False)
    times = {}
    if caps.exact or prepared.softmax_comparable and caps.form == "qkv":
        t0 = clock()
        runner.reference(case, runner.inputs(case), bound, False)
        times["exact_ref"] = clock() - t0
    if prepared.reference is not None:
        rows = runner._own_reference_rows(case, caps, prepared, False)
        bshd = caps.input_layout == "bshd" and caps.form == "qkv"
        t0 = clock()
        runner._own_reference(case, caps, prepared, call, bshd, False, rows)
        times["own_ref" + ("(rows)" if rows is not None else "(ALL rows)")] = clock() - t0
    if leak:
        t0 = clock()
        runner._leak(prepared, call, bound, caps.input_layout == "bshd")
        times["leak"] = clock() - t0
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("mask")
    parser.add_argument("seqs", help="comma-separated lengths")
    parser.add_argument("--opts", default="{}", help="method_options for the method (JSON)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--h200-heads", type=int, default=16)
    parser.add_argument("--scale", type=int, default=16, help="H200 length = scale x CPU length")
    parser.add_argument("--leak", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale_down = args.h200_heads * args.scale / args.heads
    _budgeted(scale_down)
    chunk_bytes = max(1, int((1 << 29) / scale_down))
    for seq in [int(s) for s in args.seqs.split(",")]:
        times = measure(args.method, args.mask, seq, args.heads, args.dim, json.loads(args.opts), chunk_bytes,
                        args.leak)
        print(f"{args.method} {args.mask} L={seq} (H200 ~{seq * args.scale}): "
              + " ".join(f"{k}={v:.3f}s" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
