"""Probe: does compiled flex_attention decode (one query) compile for MHA and GQA, with no BlockMask, with
torch's create_block_mask, and with attnbench's BlockMask? Prints one line per variant (ok or the error)."""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnbench import masks


def attempt(name, heads_kv, block_mask):
    torch._dynamo.reset()
    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, heads_kv, 65536, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    fn = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    try:
        fn(q, k, v, block_mask=block_mask, enable_gqa=heads_kv != 32)
        torch.cuda.synchronize()
        print(f"{name:40s} heads_kv={heads_kv:2d} ok")
    except Exception as exc:  # noqa: BLE001
        lines = [line for line in str(exc).splitlines() if "Error" in line]
        print(f"{name:40s} heads_kv={heads_kv:2d} {type(exc).__name__}: {lines[-1] if lines else exc}"[:300])


ours = masks.make_mask("causal").bind(1, 65536).block_mask("cuda")
theirs = create_block_mask(lambda b, h, q, kv: kv <= q + 65535, None, None, 1, 65536, device="cuda")
for heads_kv in (32, 8):
    attempt("no block mask", heads_kv, None)
    attempt("torch create_block_mask", heads_kv, theirs)
    attempt("attnbench BlockMask", heads_kv, ours)
