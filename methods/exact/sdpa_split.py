"""``cudnn_split``: prefix-LM as two calls of cuDNN's fused attention, split by query rows. Exact.

A prefix-LM row below the prefix sees the whole prefix; a row at or after it sees every key up to itself,
which already includes the prefix: that is plain causal attention. So

    out[:prefix] = attention(q[:prefix], k[:prefix], v[:prefix])      (full, prefix x prefix)
    out[prefix:] = causal_attention(q, k, v)[prefix:]

Both are native SDPA cases, where cuDNN is ~1.4x faster than FlexAttention on the H200, and the causal call
wastes only the prefix rows' half-triangle (prefix^2 / 2 pairs). FLOPs in the rows count visible pairs
only, so the waste shows as time, never as throughput. Gradients flow through the concatenation, so
``fwd_bwd`` is exact too.

``BACKENDS`` is the SDPA backend list (the CPU tests use the math backend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..registry import Capabilities, Unsupported, register_method
from .sdpa import DECLINES

BACKENDS = [SDPBackend.CUDNN_ATTENTION]


def prefix_rows(mask, seq: int) -> int:
    """Query rows that see the whole prefix and nothing after it."""
    return min(int(mask.spec.prefix), seq)


@register_method(
    "cudnn_split",
    Capabilities(family="exact", masks={"prefix_lm"}, cross=False, decode=False, devices=("cuda",),
                 dtypes=("float16", "bfloat16"), declines=DECLINES, gqa=True, backward=True),
    description="prefix-LM split by rows into cuDNN full (prefix) and causal (rest) attention",
    options=(),
)
def build_cudnn_split(ctx):
    case = ctx.case
    if case.seq_q != case.seq_kv:
        raise Unsupported(f"self attention only (seq_q={case.seq_q} != seq_kv={case.seq_kv})")
    prefix = prefix_rows(ctx.bound, case.seq_q)
    gqa = {"enable_gqa": True} if case.heads_kv != case.heads_q else {}
    backends = list(BACKENDS)

    def cudnn_split(q, k, v):
        with sdpa_kernel(backends):
            causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
            if prefix == 0:
                return causal
            head = F.scaled_dot_product_attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], **gqa)
        return torch.cat([head, causal[:, :, prefix:]], dim=2)

    return cudnn_split
