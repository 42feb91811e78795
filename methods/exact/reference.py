"""The reference: materialised softmax attention, chunked over query rows.

``reference_attention`` is the correctness spec every method is gated against (run in float32), and the
same function run in the working dtype gives the error a same-dtype materialised implementation makes,
which sets the gate's tolerance. Chunking over query rows keeps memory at ``chunk_bytes`` whatever the
length; gradients are accumulated chunk by chunk with autograd on each chunk's small graph.

Conventions (all methods): ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Skv, D]``, ``Hq % Hkv == 0`` (GQA: query
head ``h`` uses kv head ``h // (Hq // Hkv)``), scale ``1 / sqrt(D)``. A query row with no visible key has
output 0 and contributes no gradient.
"""
from __future__ import annotations

import math

import torch

from ..registry import Capabilities, register_method


def _bound_of(mask):
    """A MaskInfo (``ctx.mask``) unwrapped to its BoundMask; anything else (a BoundMask, a row slice of one) as is."""
    from ..contract import MaskInfo

    return mask.bound if isinstance(mask, MaskInfo) else mask


def _expand_kv(t: torch.Tensor, heads_q: int) -> torch.Tensor:
    group = heads_q // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _chunk_rows(batch: int, heads: int, seq_kv: int, elem_bytes: int, chunk_bytes: int) -> int:
    # scores, probabilities and (with grads) their gradients: ~4 [B, H, rows, Skv] tensors alive at once
    per_row = 4 * batch * heads * seq_kv * elem_bytes
    return max(1, chunk_bytes // max(1, per_row))


def _attend_rows(q_rows, k, v, visible, scale):
    scores = torch.matmul(q_rows, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key
    return torch.matmul(probs, v)


def reference_attention(q, k, v, mask, *, compute_dtype=torch.float32, dout=None, chunk_bytes=1 << 29):
    """Materialised attention in ``compute_dtype``.

    Returns ``(out, grads)``: ``out`` like ``q`` in ``compute_dtype``; ``grads = (dq, dk, dv)`` when ``dout``
    is given (same shapes as the inputs), else None. ``mask`` is a ``masks.BoundMask`` (any device).
    """
    mask = _bound_of(mask)
    batch, heads_q, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    qc = q.detach().to(compute_dtype)
    kc = _expand_kv(k.detach().to(compute_dtype), heads_q)
    vc = _expand_kv(v.detach().to(compute_dtype), heads_q)
    need_grad = dout is not None
    if need_grad:
        kc.requires_grad_(True)
        vc.requires_grad_(True)
        dq = torch.zeros_like(qc)
    out = torch.empty(batch, heads_q, seq_q, v.shape[-1], dtype=compute_dtype, device=q.device)
    elem = torch.finfo(compute_dtype).bits // 8
    rows = _chunk_rows(batch, heads_q, seq_kv, max(elem, 4), chunk_bytes)
    bound = mask.to(q.device)
    for start in range(0, seq_q, rows):
        end = min(seq_q, start + rows)
        visible = bound.dense_rows(start, end, q.device)
        q_rows = qc[:, :, start:end]
        if need_grad:
            q_rows = q_rows.detach().requires_grad_(True)
            with torch.enable_grad():
                out_rows = _attend_rows(q_rows, kc, vc, visible, scale)
                out_rows.backward(dout[:, :, start:end].to(compute_dtype))
            dq[:, :, start:end] = q_rows.grad
            out[:, :, start:end] = out_rows.detach()
        else:
            with torch.no_grad():
                out[:, :, start:end] = _attend_rows(q_rows, kc, vc, visible, scale)
    if not need_grad:
        return out, None
    heads_kv = k.shape[1]
    group = heads_q // heads_kv

    def fold(grad):  # sum the gradient of each query-head group back onto its kv head
        return grad.view(batch, heads_kv, group, seq_kv, grad.shape[-1]).sum(dim=2)

    return out, (dq, fold(kc.grad), fold(vc.grad))


def attend_rows(q, k, v, mask, rows: torch.Tensor, *, chunk_bytes=1 << 29) -> torch.Tensor:
    """fp32 outputs of the query rows ``rows`` (int64 indices) only, ``[B, Hq, len(rows), D]``: what the gate
    checks at lengths where the whole reference would cost too much (each row is independent)."""
    mask = _bound_of(mask).to(q.device)
    batch, heads_q, _, head_dim = q.shape
    seq_kv = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    kc = _expand_kv(k.detach().float(), heads_q)
    vc = _expand_kv(v.detach().float(), heads_q)
    out = torch.empty(batch, heads_q, rows.numel(), v.shape[-1], dtype=torch.float32, device=q.device)
    step = _chunk_rows(batch, heads_q, seq_kv, 4, chunk_bytes)
    with torch.no_grad():
        for start in range(0, rows.numel(), step):
            picked = rows[start:start + step]
            visible = torch.cat([mask.dense_rows(int(r), int(r) + 1, q.device) for r in picked.tolist()])
            out[:, :, start:start + picked.numel()] = _attend_rows(q.detach()[:, :, picked].float(), kc, vc, visible, scale)
    return out


@register_method(
    "reference",
    Capabilities(family="exact", masks={"any"}, cross=True, gqa=True, backward=True, decode=True),
    description="fp32 materialised softmax, chunked over query rows (bounded memory): the correctness spec",
)
def build_reference(ctx):
    """fp32 materialised softmax attention (the spec), cast back to the working dtype."""
    mask = ctx.bound
    chunk = ctx.options.get("ref_chunk_bytes", 1 << 29)

    class _Reference(torch.autograd.Function):
        @staticmethod
        def forward(fctx, q, k, v):
            fctx.save_for_backward(q, k, v)
            out, _ = reference_attention(q, k, v, mask, chunk_bytes=chunk)
            return out.to(q.dtype)

        @staticmethod
        def backward(fctx, dout):
            q, k, v = fctx.saved_tensors
            _, (dq, dk, dv) = reference_attention(q, k, v, mask, dout=dout, chunk_bytes=chunk)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    return _Reference.apply
