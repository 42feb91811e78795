"""The fused WY pieces' backward kernel (wy_backward: triton) against autograd through the PyTorch pieces, on
the GPU, one variant per line: the twelfth session's H200 run gated it wrong (delta_rule dk rel_err 0.42,
gated_delta_rule dg 0.011 at 8K and 32K; h200-linear-delta-fused-v2) where TRITON_INTERPRET=1 agrees to 1e-5.
Each line: relative error (norm) of dq, dk, dv, dg, dβ for one kernel variant (dot precision, warps,
normalisation on or off), at one chunk size.
Runs (twelfth session, console logs in results/h200-linear-delta-fused-v3/device-logs/s12/): s12-c ran a diagnostic
build with two more variants (num_stages=1: an illegal memory access that ended the process after the first
line; the dk part from step 3 kept in its own buffer), not kept; s12-d and s12-e ran --base-only: at C = 64 wrong
and different from run to run (delta_rule dk 0.24 / 0.19, gated dk 2e2 / 3e2), at C = 32 and 16 right (dk
2.5e-5 ... 4.8e-5): wy_triton.MAX_BACKWARD_CHUNK is 32 since.
    python3 scripts/wy_backward_check.py [--length 1024] [--heads 4] [--chunk 64] [--base-only]"""
import argparse
import sys
import time

import torch

from attnbench.methods.linear import wy_triton as wt


def rel(a, b):
    a, b = a.float(), b.float()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--base-only", action="store_true", help="the default kernel only (no variants)")
    args = ap.parse_args()
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    B, H, L, D, C = 1, args.heads, args.length, args.dim, args.chunk

    def rnd(*shape):
        return torch.randn(*shape, device=dev, generator=gen)

    q, k, v = (rnd(B, H, L, D).bfloat16() for _ in range(3))
    g = -torch.nn.functional.softplus(rnd(B, H, L)) * 0.1
    beta = torch.sigmoid(rnd(B, H, L))
    n = -(-L // C)
    variants = [dict(), dict(dot_precision="ieee"), dict(dot_precision="tf32"), dict(num_warps=4),
                dict(normalize=False)]
    variants = variants[:1] if args.base_only else variants
    for gated in (False, True):
        gg = g if gated else None
        for var in variants:
            normalize = var.get("normalize", True)
            kw = {key: val for key, val in var.items() if key != "normalize"}
            dp = [rnd(B, H, n, C, D), rnd(B, H, n, C, C), rnd(B, H, n, C, D), rnd(B, H, n, C, D), rnd(B, H, n, C, D),
                  rnd(B, H, n)]
            leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, v, gg, beta)]
            pieces = wt.reference_pieces(*leaves, delta=True, chunk=C, normalize=normalize)
            pairs = [(p, d) for p, d in zip(pieces, dp) if p is not None and p.requires_grad]
            used = [t for t in leaves if t is not None]
            want = torch.autograd.grad([p for p, _ in pairs], used, [d for _, d in pairs], allow_unused=True)
            t0 = time.time()
            try:
                got = [t for t in wt.pieces_backward(q, k, v, gg, beta, dp, delta=True, chunk=C, normalize=normalize,
                                                     **kw) if t is not None]
                torch.cuda.synchronize()
                errs = " ".join(f"{name}={rel(a, b):.2e}" for name, a, b in
                                zip(("dq", "dk", "dv", "dg", "dbeta") if gated else ("dq", "dk", "dv", "dbeta"),
                                    got, want))
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a line too
                errs = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"gated={int(gated)} {var}: {errs} ({time.time() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
