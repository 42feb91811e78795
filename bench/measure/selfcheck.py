"""``attnbench selfcheck``: the harness's timer against ``triton.testing.do_bench`` on the same callables.

For each (method, seq) it builds the method exactly as a sweep would, times the forward with the harness
(CUDA events, L2 flush, median) and with ``do_bench`` (its own L2 flush, median), and prints the ratio.
The harness is trusted when the medians agree within ``--tolerance`` (default 3 %). Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="attnbench selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["sdpa_cudnn", "sdpa_flash", "flex"])
    parser.add_argument("--seq", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--mask", default="full")
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of each timer")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("attnbench selfcheck: needs a CUDA GPU (none visible)", file=sys.stderr)
        return 2
    import triton.testing

    from attnbench import masks
    from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared

    from attnbench.config.plan import Case
    from attnbench.measure.timing import time_callable

    device = torch.device("cuda:0")
    timing = {"budget_ms": 300.0, "warmup_ms": 50.0, "min_reps": 20, "max_reps": 500, "flush_l2": True}
    results, worst = [], 0.0
    for seq in args.seq:
        for name in args.methods:
            spec = masks.make_mask(args.mask)
            case = Case(method=name, mask=spec.label, mask_name=spec.name, batch=max(1, args.tokens // seq),
                        heads_q=args.heads, heads_kv=args.heads, seq_q=seq, seq_kv=seq, head_dim=args.head_dim,
                        dtype="bfloat16", mode="fwd", device="cuda:0")
            bound = spec.bind(seq, seq).to(device)
            shape = (case.batch, case.heads_q, seq, case.head_dim)
            q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3))
            ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=device, dtype=torch.bfloat16)
            fn = as_prepared(METHODS[name].build(ctx)).fn

            def call():
                with torch.no_grad():
                    return fn(q, k, v)

            call()
            # interleave the two timers over several rounds so clock and thermal drift hit both alike
            ours_runs, theirs_runs = [], []
            for _ in range(args.rounds):
                ours_runs.append(time_callable(call, device, timing).ms_median)
                theirs_runs.append(triton.testing.do_bench(call, warmup=50, rep=300, return_mode="median"))
            ours, theirs = statistics.median(ours_runs), statistics.median(theirs_runs)
            ratio = ours / theirs
            worst = max(worst, abs(ratio - 1.0))
            results.append({"method": name, "seq": seq, "batch": case.batch, "harness_ms": ours,
                            "do_bench_ms": theirs, "ratio": ratio, "harness_runs": ours_runs,
                            "do_bench_runs": theirs_runs})
            print(f"{name:16s} seq {seq:6d}  harness {ours:9.4f} ms  do_bench {theirs:9.4f} ms  ratio {ratio:.4f}")
    verdict = worst <= args.tolerance
    print(f"largest deviation {worst * 100:.2f} % (tolerance {args.tolerance * 100:.1f} %): {'PASS' if verdict else 'FAIL'}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"results": results, "max_deviation": worst, "pass": verdict}, handle, indent=1)
    return 0 if verdict else 1
