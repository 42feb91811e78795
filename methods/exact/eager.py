"""Eager attention: the whole softmax materialised in the working dtype (CAB's "vanilla" baseline)."""
from __future__ import annotations

import math

import torch

from ..registry import Capabilities, register_method


@register_method(
    "eager",
    Capabilities(family="exact", masks={"any"}, materializes=True, cross=True, gqa=True, backward=True, decode=True),
    description="materialised softmax in the working dtype (CAB's vanilla attention)",
    options=(),
)
def build_eager(ctx):
    """Scores, mask, softmax and weighted sum as separate PyTorch ops, in the working dtype."""
    visible = ctx.bound.dense(ctx.device, max_bytes=ctx.options.get("dense_mask_bytes", 1 << 31))
    full = bool(visible.all())
    heads_q, heads_kv = ctx.case.heads_q, ctx.case.heads_kv
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(ctx.case.head_dim)

    def eager(q, k, v):
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if not full:
            scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, v)

    return eager
