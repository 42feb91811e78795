"""Compile the own linear-attention Triton kernels for an H100/H200 (sm_90a) without a GPU and print, for every
launch a forward + backward makes, the shared memory it needs (against the 227 KB limit) and its register
spills (ptxas -v, the ptxas bundled with triton): a proxy for their speed that the CPU can give, and a check
that they compile and fit at all (Triton's interpreter, which the CPU tests use, compiles nothing). The
launches are the real ones (methods/triton_fit.py records them), specialised as the JIT would.

    python scripts/triton_spills.py                 # head dim 128, num_warps 4 and 8
    python scripts/triton_spills.py --width 256 4   # 256-wide q / k / v (cosFormer's features: --width 256 --v 128)
"""
from __future__ import annotations

import argparse

import torch

from attnbench.methods.linear import gla_triton, linear_triton
from attnbench.methods.triton_fit import SM90, compile_launch, ptxas_usage, record_launches


def calls(width: int, v_width: int, seq: int = 1024):
    """(label, launches) of linear_attn (precomputed and fused φ) and simple_gla, forward and backward, bf16,
    chunk 64, block_v 64, 2 heads (the kernels do not depend on the head count)."""
    torch.manual_seed(0)

    def tensors():
        q, k = (torch.randn(1, 2, seq, width, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        return q, k, torch.randn(1, 2, seq, v_width, dtype=torch.bfloat16, requires_grad=True)

    out = []
    for fmap in ("precomputed", "fused"):
        with record_launches() as launches:
            linear_triton.linear_attn(*tensors(), feature_map=fmap).sum().backward()
        out.append((f"linear_attn ({fmap} φ)", launches))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 2, seq)).requires_grad_()
    with record_launches() as launches:
        gla_triton.simple_gla(*tensors(), g).sum().backward()
    out.append(("simple_gla", launches))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("warps", nargs="*", type=int, default=[4, 8])
    ap.add_argument("--width", type=int, default=128, help="q / k width (default 128)")
    ap.add_argument("--v", type=int, default=None, help="v width (default: --width)")
    a = ap.parse_args()
    for label, launches in calls(a.width, a.v or a.width):
        print(f"== {label}: {len(launches)} launches")
        for i, launch in enumerate(launches):
            keys = {k: launch.kwargs[k] for k in ("BK", "BV", "NORM", "FEATURE", "EXTRA", "REVERSE", "TRANS_S")
                    if k in launch.kwargs}
            cells = []
            for w in a.warps:
                kernel = compile_launch(launch, num_warps=w)
                st, ld, regs = ptxas_usage(kernel)
                shared = kernel.metadata.shared
                flag = "" if shared <= SM90["shared_limit"] else " OVER"
                cells.append(f"{w} warps: {shared // 1024} KB{flag}, {st}/{ld} B spilled, {regs} regs")
            print(f"  {i} {launch.name:24s} {keys}  " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
