"""How much would bf16 dots in the delta rules' Triton state loop (methods/linear/delta_triton.py,
``dot_precision: bf16``) and in ``chunk_outputs`` (``gated_delta.chunk_outputs(..., bf16=True)``) cost in
accuracy? Emulated on the CPU as scripts/delta_tf32_check.py does for tf32: the PyTorch chunk loop with the
operands of its two matmuls per chunk rounded to bf16 (round to nearest even, ``Tensor.bfloat16()``, as the
kernel's ``.to(tl.bfloat16)``), products accumulated in fp32, the state carried in fp32; against the fp32
chunked form with half the chunk (the methods' reference above the token loop's length); relative L2 error of
the outputs (the correctness gate's measure; bf16's gate is 8e-3 for outputs, 9e-3 for gradients). Forward
only: gradients are measured by the device gate. Usage (``--length``, ``--heads``; d = 128):
    python scripts/delta_bf16_check.py

Measured (twelfth-session helper, 2-core workstation; not committed under results/): 8K tokens, 2 heads,
outputs' relative L2 error, loop bf16 | loop and chunk_outputs bf16 (tf32 loop beside it): gated_delta_rule
3.5e-4 | 3.7e-3 (1.3e-4), delta_rule 3.9e-3 | 5.1e-3 (1.2e-3), simple_gla 2.0e-4 | 3.3e-3 (8.7e-5); 32K, 1 head:
the same to two digits (3.3e-4 | 3.7e-3, 4.0e-3 | 5.1e-3, 1.9e-4 | 3.3e-3): flat in length.
"""
import argparse

import torch
import torch.nn.functional as F

from attnbench.methods.linear import gated_delta as G


def bf16(x):
    return x.bfloat16().float()


def rounding_loop(rnd):
    def loop(U, W, kd, last, state0):
        B, H, N = U.shape[:3]
        states = state0.new_empty(B, H, N, *state0.shape[-2:])
        S = state0
        for c in range(N):
            states[:, :, c] = S
            new = U[:, :, c] if W is None else U[:, :, c] - rnd(W[:, :, c]) @ rnd(S)
            S = last[:, :, c, None, None] * S + rnd(kd[:, :, c]).transpose(-1, -2) @ rnd(new)
        return states, S
    return loop


def tf32(x):  # as scripts/delta_tf32_check.py
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    L, H, d = args.length, args.heads, 128
    q, k, v = (torch.randn(1, H, L, d).bfloat16() for _ in range(3))
    g, beta = F.logsigmoid(torch.randn(1, H, L)), torch.rand(1, H, L)
    print(f"L {L}, heads {H}, d {d}, chunk 64; relative L2 error of the outputs against the fp32 reference (chunk 32)")
    with torch.no_grad():
        for name, (gated, delta, norm) in G.VARIANTS.items():
            kw = dict(gated=gated, delta=delta, normalize=norm)
            ref = G.chunked(q, k, v, g, beta, chunk=32, **kw).float()
            row = []
            for label, fn, outs in (("fp32", None, False), ("tf32 loop", rounding_loop(tf32), False),
                                    ("bf16 loop", rounding_loop(bf16), False),
                                    ("bf16 loop+outputs", rounding_loop(bf16), True)):
                got = G.chunked(q, k, v, g, beta, chunk=64, states_fn=fn, bf16_outputs=outs, **kw).float()
                row.append(f"{label} {((got - ref).norm() / ref.norm()).item():.2e}")
            print(name, " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
