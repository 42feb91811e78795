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


def softmax_in_key_blocks(q_rows: torch.Tensor, n_keys: int, keys, values, visible, scale: float,
                          block: int) -> torch.Tensor:
    """Exact softmax attention of ``q_rows [B, H, R, D]`` (fp32) over ``n_keys`` keys taken ``block`` at a
    time, in two passes: the row maxima over every block, then ``exp(score - max)`` summed and applied to the
    values block by block (the same softmax as one materialised ``[R, n_keys]`` row, fp32 rounding aside).
    ``keys(start, end)`` and ``values(start, end)`` give k and v of keys ``[start, end)``, fp32 ``[B, H, n, D]``;
    ``visible(start, end)`` their visibility, bool broadcastable to ``[B, H, R, n]``. A row that sees no key
    gives 0. Memory: a few ``[B, H, R, block]`` tensors, never ``R x n_keys`` scores; K and V are read twice
    and once whatever R is (a long case's sampled rows all go through one pass over the keys)."""
    shape = q_rows.shape[:-1]
    top = torch.full(shape, float("-inf"), dtype=torch.float32, device=q_rows.device)
    for start in range(0, n_keys, block):
        end = min(n_keys, start + block)
        scores = torch.matmul(q_rows, keys(start, end).transpose(-1, -2)).mul_(scale)
        scores.masked_fill_(~visible(start, end), float("-inf"))
        top = torch.maximum(top, scores.amax(dim=-1))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows that see nothing: weights 0
    total = torch.zeros(shape, dtype=torch.float32, device=q_rows.device)
    out = None
    for start in range(0, n_keys, block):
        end = min(n_keys, start + block)
        scores = torch.matmul(q_rows, keys(start, end).transpose(-1, -2)).mul_(scale)
        scores.masked_fill_(~visible(start, end), float("-inf"))
        weights = scores.sub_(top[..., None]).exp_()
        total += weights.sum(dim=-1)
        part = torch.matmul(weights, values(start, end))
        out = part if out is None else out.add_(part)
    if out is None:  # no keys at all
        return q_rows.new_zeros(q_rows.shape)
    return out / total.clamp_min(torch.finfo(total.dtype).tiny)[..., None]


def key_block(batch: int, heads: int, rows: int, budget_bytes: int, minimum: int = 128) -> int:
    """Keys per block of :func:`softmax_in_key_blocks` so that ~3 fp32 ``[B, H, rows, block]`` tensors fit
    ``budget_bytes`` (at least ``minimum``)."""
    return max(minimum, budget_bytes // max(1, 3 * 4 * batch * heads * rows))


def attend_rows(q, k, v, mask, rows: torch.Tensor, *, chunk_bytes=1 << 29) -> torch.Tensor:
    """fp32 outputs of the query rows ``rows`` (int64 indices) only, ``[B, Hq, len(rows), D]``: what the gate
    checks at lengths where the whole reference would cost too much (each row is independent).

    O(rows x seq_kv) work in one pass over the keys: every sampled row at once (in row groups only where
    ``chunk_bytes`` cannot hold the scores of 128 keys), keys in blocks (:func:`softmax_in_key_blocks`),
    cast to fp32 block by block (no fp32 copy of K and V), the mask of a block from one vectorised
    ``mask_mod`` call at the sampled rows (``BoundMask.visible_rows``). Before, rows went in chunks sized for
    whole ``[rows, seq_kv]`` scores (2 rows at 1M keys and 16 heads): K and V were read once per chunk, so
    the work grew as rows x seq_kv^2 / chunk_bytes, and each row's mask was a separate call."""
    mask = _bound_of(mask).to(q.device)
    batch, heads_q, _, head_dim = q.shape
    seq_kv = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    rows = rows.to(q.device)
    out = torch.empty(batch, heads_q, rows.numel(), v.shape[-1], dtype=torch.float32, device=q.device)
    group = max(1, chunk_bytes // (3 * 4 * batch * heads_q * 128))  # rows whose 128-key scores fit the budget
    with torch.no_grad():
        for start in range(0, rows.numel(), group):
            picked = rows[start:start + group]
            q_rows = q.detach()[:, :, picked].float()

            def keys(k0, k1):
                return _expand_kv(k.detach()[:, :, k0:k1].float(), heads_q)

            def values(k0, k1):
                return _expand_kv(v.detach()[:, :, k0:k1].float(), heads_q)

            def visible(k0, k1, picked=picked):
                return mask.visible_rows(picked, k0, k1, q.device)

            block = key_block(batch, heads_q, picked.numel(), chunk_bytes)
            out[:, :, start:start + picked.numel()] = softmax_in_key_blocks(q_rows, seq_kv, keys, values, visible,
                                                                            scale, block)
    return out


@register_method(
    "reference",
    Capabilities(family="exact", masks={"any"}, cross=True, gqa=True, backward=True, decode=True),
    description="fp32 materialised softmax, chunked over query rows (bounded memory): the correctness spec",
    options=(),
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
