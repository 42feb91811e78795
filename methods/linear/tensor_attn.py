"""Tensor (Kronecker, triple-wise) attention (Alman & Song, ICLR 2024, arXiv:2310.04064), §11.

Inputs q, k1 = k, v1 = v and the extra key/value set ``k2``, ``v2`` (``Prepared.extras``). For query i:
``s_i(j1, j2) = τ Σ_l q_il k1_{j1,l} k2_{j2,l}``, ``o_i = Σ_{j1,j2} softmax_{(j1,j2)}(s_i) · (v1_{j1} ∘ v2_{j2})``
(τ = 1/√d by default). Causal: both ``j1`` and ``j2`` ≤ i + offset. Exact of its own definition, cubic:
O(Lq · Lk² · d) — short lengths only (``max_len``, default 512; longer cases are ``unsupported``).
A different operator: no approx_err. Gated against its own reference (exact=False in the harness's terms).

Forms: the reference materialises ``[B, H, Lq, Lk, Lk]``; the fast path takes query blocks (``block`` rows),
restricts a causal block to the keys its last row sees, and checkpoints each block so backward memory
stays at one block's scores. fp32 inside. Hyper-parameters: ``max_len``, ``block`` (default 16), ``scale``.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..contract import Extra, Prepared
from ..registry import Capabilities, Unsupported, register_method
from .common import causal_visible, mask_mode, param_float, param_int


def tensor_reference(q, k1, v1, k2, v2, *, causal, offset, scale):
    s = torch.einsum("bhid,bhjd,bhkd->bhijk", q, k1, k2) * scale
    lq, lk = q.shape[2], k1.shape[2]
    if causal:
        vis = causal_visible(lq, lk, offset, q.device)
        pair = vis[:, :, None] & vis[:, None, :]
        s = s.masked_fill(~pair, float("-inf"))
    p = torch.softmax(s.flatten(-2), dim=-1).view_as(s)
    p = torch.nan_to_num(p, nan=0.0)
    return torch.einsum("bhijk,bhjd,bhkd->bhid", p, v1, v2)


def _block(qb, k1, v1, k2, v2, row0: int, causal: bool, offset: int, scale: float):
    s = torch.einsum("bhid,bhjd,bhkd->bhijk", qb, k1, k2) * scale
    if causal:
        rows = torch.arange(row0, row0 + qb.shape[2], device=qb.device)
        cols = torch.arange(k1.shape[2], device=qb.device)
        vis = cols[None, :] <= rows[:, None] + offset
        s = s.masked_fill(~(vis[:, :, None] & vis[:, None, :]), float("-inf"))
    p = torch.nan_to_num(torch.softmax(s.flatten(-2), dim=-1), nan=0.0).view_as(s)
    inner = torch.einsum("bhijk,bhkd->bhijd", p, v2)
    return (inner * v1[:, :, None]).sum(3)


def tensor_blocked(q, k1, v1, k2, v2, *, causal, offset, scale, block):
    dtype = q.dtype
    q, k1, v1, k2, v2 = (t.float() for t in (q, k1, v1, k2, v2))
    outs = []
    for r0 in range(0, q.shape[2], block):
        qb = q[:, :, r0:r0 + block]
        keys = k1.shape[2]
        if causal:
            keys = max(0, min(keys, r0 + qb.shape[2] + offset))
        if keys == 0:
            outs.append(qb.new_zeros(*qb.shape[:3], v1.shape[-1]))
            continue
        args = (qb, k1[:, :, :keys], v1[:, :, :keys], k2[:, :, :keys], v2[:, :, :keys])
        if torch.is_grad_enabled():
            outs.append(checkpoint(_block, *args, r0, causal, offset, scale, use_reentrant=False))
        else:
            outs.append(_block(*args, r0, causal, offset, scale))
    return torch.cat(outs, dim=2).to(dtype)


@register_method("tensor_attn", Capabilities(family="linear", exact=False, masks={"full", "causal"}, cross=True,
                                              backward=True), options=("max_len", "block", "scale"))
def build_tensor_attn(ctx):
    """Tensor (Kronecker) attention over pairs of keys from two key/value sets; cubic, short lengths."""
    causal, offset = mask_mode(ctx)
    case = ctx.case
    max_len = param_int(ctx, "max_len", 512, minimum=1)
    block = param_int(ctx, "block", 16, minimum=1)
    scale = param_float(ctx, "scale", 1.0 / math.sqrt(case.head_dim), minimum=0.0)
    if max(case.seq_q, case.seq_kv) > max_len:
        raise Unsupported(f"tensor attention is cubic (Lq·Lk²·d): length {max(case.seq_q, case.seq_kv)} is over "
                          f"method_options.tensor_attn.max_len={max_len}")
    keys = (case.batch, case.heads_q, case.seq_kv, case.head_dim)
    values = (case.batch, case.heads_q, case.seq_kv, ctx.head_dim_v)  # v2 is as wide as v, not as q and k
    kw = dict(causal=causal, offset=offset, scale=scale)
    return Prepared(fn=lambda q, k, v, k2, v2: tensor_blocked(q, k, v, k2, v2, block=block, **kw),
                    reference=lambda q, k, v, k2, v2: tensor_reference(q, k, v, k2, v2, **kw),
                    extras={"k2": Extra(shape=keys), "v2": Extra(shape=values)}, softmax_comparable=False)
