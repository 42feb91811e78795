"""Softmax attention as an RNN: the exact online-softmax recurrence over keys (Feng et al., "Attention as
an RNN", arXiv:2405.13956, §3.1: attention as a many-to-one RNN; the same bookkeeping as FlashAttention).

For a query q, the keys are consumed as a sequence with the state (running max m, normaliser c, weighted
sum a):  ``m' = max(m, s_j)``, ``c' = c·e^(m−m') + e^(s_j−m')``, ``a' = a·e^(m−m') + v_j e^(s_j−m')``,
``out = a / c`` — exactly softmax attention (``exact=True``: gated against the harness's fp32 softmax).

Forms: :func:`token_recurrence` (one key per step, the plain loop: readable, slow) and the block form
(keys consumed ``block`` at a time, all queries in parallel; a custom autograd backward recomputes the
probabilities from the saved log-sum-exp, so memory stays O(L·d)). Computes in fp32. The reference (the token
loop) has a ``rows=`` form for sampled query rows, :func:`softmax_rows` (keys streamed in chunks of
``reference_stream_chunk``); the harness gates this exact method on its own fp32 softmax, so that form serves
direct callers.

Decode, decided honestly: the recurrence runs over *keys for a fixed query*. A new token brings a new
query, whose state must be rebuilt from the whole cache, so there is no O(1) recurrent decode for softmax
attention; ``decode`` rows run the same recurrence over the cache for the one new query (O(context) per
step, no ``state_bytes``). The fixed-query case that does have an O(1) state is Aaren (``aaren``).
Hyper-parameter: ``block`` (keys per step of the block form, default 1024).
"""
from __future__ import annotations

import math

import torch

from ..registry import Capabilities, register_method
from . import rows as rows_mod
from .common import expand_heads, mask_mode, param_int


def token_recurrence(q, k, v, *, causal: bool, offset: int):
    """The plain RNN: for every query, one key per step. fp32 in, fp32 out; O(Skv) Python steps."""
    q, k, v = q.float(), expand_heads(k, q.shape[1]).float(), expand_heads(v, q.shape[1]).float()
    scale = 1.0 / math.sqrt(q.shape[-1])
    seq_q = q.shape[2]
    m = torch.full(q.shape[:3], float("-inf"), device=q.device)
    c = torch.zeros(q.shape[:3], device=q.device)
    a = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device)
    rows = torch.arange(seq_q, device=q.device)
    for j in range(k.shape[2]):
        s = (q * k[:, :, j:j + 1]).sum(-1) * scale
        if causal:
            s = s.masked_fill(j > rows + offset, float("-inf"))
        m_new = torch.maximum(m, s)
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        decay = torch.exp(m - safe)
        weight = torch.exp(s - safe)
        c = c * decay + weight
        a = a * decay[..., None] + weight[..., None] * v[:, :, j:j + 1]
        m = m_new
    return torch.where(c[..., None] > 0, a / c.clamp_min(1e-30)[..., None], torch.zeros_like(a))


def _first_row(j0: int, causal: bool, offset: int) -> int:
    """The first query row that sees key j0 (causal: j0 <= i + offset)."""
    return max(0, j0 - offset) if causal else 0


class _BlockRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, causal: bool, offset: int, block: int):
        qf, kf, vf = q.float(), k.float(), v.float()
        batch, heads, seq_q, _ = qf.shape
        seq_kv = kf.shape[2]
        scale = 1.0 / math.sqrt(qf.shape[-1])
        m = torch.full((batch, heads, seq_q, 1), float("-inf"), device=q.device)
        c = torch.zeros(batch, heads, seq_q, 1, device=q.device)
        a = torch.zeros(batch, heads, seq_q, vf.shape[-1], device=q.device)
        rows = torch.arange(seq_q, device=q.device)
        for j0 in range(0, seq_kv, block):
            j1 = min(seq_kv, j0 + block)
            r0 = _first_row(j0, causal, offset)
            if r0 >= seq_q:
                break
            s = (qf[:, :, r0:] @ kf[:, :, j0:j1].transpose(-1, -2)) * scale
            if causal:
                hidden = torch.arange(j0, j1, device=q.device)[None, :] > (rows[r0:, None] + offset)
                s = s.masked_fill(hidden, float("-inf"))
            m_old = m[:, :, r0:]
            m_new = torch.maximum(m_old, s.amax(-1, keepdim=True))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - safe)
            decay = torch.exp(m_old - safe)
            c[:, :, r0:] = c[:, :, r0:] * decay + p.sum(-1, keepdim=True)
            a[:, :, r0:] = a[:, :, r0:] * decay + p @ vf[:, :, j0:j1]
            m[:, :, r0:] = m_new
        seen = c > 0
        out = torch.where(seen, a / c.clamp_min(1e-30), torch.zeros_like(a))
        lse = torch.where(seen, m + torch.log(c.clamp_min(1e-30)), torch.full_like(m, float("inf")))
        fctx.save_for_backward(qf, kf, vf, out, lse)
        fctx.args = (causal, offset, block, q.dtype, k.dtype, v.dtype)
        return out.to(v.dtype)

    @staticmethod
    def backward(fctx, dout):
        qf, kf, vf, out, lse = fctx.saved_tensors
        causal, offset, block, qd, kd, vd = fctx.args
        dout = dout.float()
        seq_q, seq_kv = qf.shape[2], kf.shape[2]
        scale = 1.0 / math.sqrt(qf.shape[-1])
        delta = (dout * out).sum(-1, keepdim=True)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        rows = torch.arange(seq_q, device=qf.device)
        for j0 in range(0, seq_kv, block):
            j1 = min(seq_kv, j0 + block)
            r0 = _first_row(j0, causal, offset)
            if r0 >= seq_q:
                break
            s = (qf[:, :, r0:] @ kf[:, :, j0:j1].transpose(-1, -2)) * scale
            p = torch.exp(s - lse[:, :, r0:])  # rows with no key: lse = inf -> 0
            if causal:
                hidden = torch.arange(j0, j1, device=qf.device)[None, :] > (rows[r0:, None] + offset)
                p = p.masked_fill(hidden, 0.0)
            dv[:, :, j0:j1] = p.transpose(-1, -2) @ dout[:, :, r0:]
            dp = dout[:, :, r0:] @ vf[:, :, j0:j1].transpose(-1, -2)
            ds = p * (dp - delta[:, :, r0:]) * scale
            dq[:, :, r0:] += ds @ kf[:, :, j0:j1]
            dk[:, :, j0:j1] = ds.transpose(-1, -2) @ qf[:, :, r0:]
        return dq.to(qd), dk.to(kd), dv.to(vd), None, None, None


def block_recurrence(q, k, v, *, causal: bool, offset: int, block: int = 1024):
    """The block form: keys ``block`` at a time for every query at once (exact; fp32 inside)."""
    heads = q.shape[1]
    return _BlockRecurrence.apply(q, expand_heads(k, heads), expand_heads(v, heads), causal, offset, block)


def softmax_rows(q, k, v, rows, *, causal: bool, offset: int, chunk: int = rows_mod.ROWS_CHUNK, carry: bool = True):
    """The recurrence's output on query rows ``rows`` only (``[B, H, len(rows), dv]``, fp32): the same online
    softmax over the keys for just those queries, keys streamed ``chunk`` at a time (:func:`rows.softmax_rows`),
    O(len(rows) · Skv) work, O(len(rows) · chunk) extra memory. ``carry``: see :func:`rows.softmax_rows`."""
    heads = q.shape[1]
    rows = rows.to(q.device).long()
    qr = q[:, :, rows].float()
    scale = 1.0 / math.sqrt(q.shape[-1])

    def chunk_fn(start, stop):
        kc = expand_heads(k[:, :, start:stop], heads).float()
        return (qr @ kc.transpose(-1, -2)) * scale, expand_heads(v[:, :, start:stop], heads)

    last = rows_mod.last_keys(rows, causal=causal, offset=offset, seq_kv=k.shape[2])
    return rows_mod.softmax_rows(chunk_fn, k.shape[2], last, chunk=chunk, carry=carry)


@register_method("softmax_rnn", Capabilities(family="linear", exact=True, masks={"full", "causal", "decode"},
                                              cross=True, gqa=True, backward=True, decode=True),
                 options=("block", "reference_stream_chunk"))
def build_softmax_rnn(ctx):
    """Softmax attention as an RNN over keys (online softmax, block form; exact, O(L²) work, O(L) memory)."""
    causal, offset = mask_mode(ctx)
    block = param_int(ctx, "block", 1024, minimum=1)

    def fn(q, k, v):
        return block_recurrence(q, k, v, causal=causal, offset=offset, block=block)

    stream = param_int(ctx, "reference_stream_chunk", rows_mod.ROWS_CHUNK)

    def reference(q, k, v, rows=None):
        if rows is not None:  # sampled query rows (long cases), streamed over the keys
            return softmax_rows(q, k, v, rows, causal=causal, offset=offset, chunk=stream).to(q.dtype)
        return token_recurrence(q, k, v, causal=causal, offset=offset).to(q.dtype)

    from ..contract import Prepared

    return Prepared(fn=fn, reference=reference)
