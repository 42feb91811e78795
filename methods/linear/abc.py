"""ABC, Attention with Bounded-memory Control (Peng et al., ACL 2022, arXiv:2110.02488), control by slot
scores given as an extra input (in a layer they come from the hidden states: ABC-MLP).

n memory slots; per key j a control vector ``e_j = exp(s_j)`` (``s`` [B, H, Lk, n], ``Extra(randn)``).
Query i reads the memory built from the keys it sees: ``K̃_i = Σ_j e_j ⊗ k_j / Σ_j e_j`` and ``Ṽ_i`` alike (per
slot), then ``o_i = softmax_slots(K̃_i q_i / √d) · Ṽ_i``. Causal: prefix sums; full: all keys.
Both reads are unnormalised linear attentions, so the chunked form is two passes of the kernelised skeleton:
``logits = LA(q, k; values e) / LA(1, 1; e)``, then ``o = LA(p / Z, e; v)``; the reference materialises
``K̃_i, Ṽ_i`` (``[B, H, Lq, n, d]``) up to ``reference_naive_max`` elements, else runs the chunked form in
fp32 with half the chunk; its ``rows=`` form (:func:`abc_rows`, long cases' sampled rows) streams the keys in
chunks of ``reference_stream_chunk`` with the prefix sums carried. ``s`` is shifted by its global per-slot maximum (it cancels exactly: no ε).
Recurrent decode: state ``(Σ e⊗k, Σ e⊗v, Σ e, m)`` (``m``: the running per-slot maximum, :func:`abc_decode`),
O(n·d) per head and step. A different operator (class N): no
approx_err. Hyper-parameters: ``slots`` (n, default 64), ``chunk`` (default 128), ``segment`` (causal self
attention runs in segments of this many tokens with the slot sums carried, checkpointed with gradients:
:func:`abc_segmented`; default 65536, 0: the whole sequence at once; a multiple of ``chunk``),
``reference_naive_max``.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..contract import Extra, Prepared, RecurrentDecode
from ..registry import Capabilities, register_method
from . import common
from .common import LINEAR_MASKS, causal_visible, chunked_linear, expand_heads, mask_mode, param_int
from .rows import ROWS_CHUNK, last_keys


def _controls(s):
    return torch.exp(s.float() - s.float().amax(dim=2, keepdim=True).detach())


def abc_chunked(q, k, v, s, *, causal, offset, chunk):
    dtype = q.dtype
    heads = q.shape[1]
    qf, kf, vf = q.float(), expand_heads(k, heads).float(), expand_heads(v, heads).float()
    e = _controls(s)
    kw = dict(causal=causal, offset=offset, eps=0.0, chunk=chunk, normalize=False)
    ones_q, ones_k = qf.new_ones(*qf.shape[:3], 1), kf.new_ones(*kf.shape[:3], 1)
    Z = chunked_linear(ones_q, ones_k, e, **kw)  # Σ_j e_j  [B, H, Lq, n]
    seen = Z > 0
    Zs = torch.where(seen, Z, torch.ones_like(Z))
    logits = chunked_linear(qf, kf, e, **kw) / Zs / math.sqrt(q.shape[-1])
    p = torch.softmax(logits, dim=-1)
    read = torch.where(seen, p / Zs, torch.zeros_like(p))
    return chunked_linear(read, e, vf, **kw).to(dtype)


SEGMENT = 1 << 16  # tokens per segment of the causal fast path (``method_options.abc.segment``)


def _segment(q, k, v, s, shift, mem_k, mem_v, z, chunk: int):
    """One causal segment of :func:`abc_chunked` (queries and keys the same tokens), entering with the sums
    over the earlier tokens ``mem_k = Σ e⊗k`` [B, H, n, d], ``mem_v = Σ e⊗v`` [B, H, n, dv], ``z = Σ e``
    [B, H, n]: the same three chunked passes, each starting from that state; returns the segment's output
    (``q``'s dtype) and the sums through its last token."""
    heads = q.shape[1]
    qf, kf, vf = q.float(), expand_heads(k, heads).float(), expand_heads(v, heads).float()
    e = torch.exp(s.float() - shift)
    kw = dict(causal=True, offset=0, eps=0.0, chunk=chunk, normalize=False)
    ones_q, ones_k = qf.new_ones(*qf.shape[:3], 1), kf.new_ones(*kf.shape[:3], 1)
    unused = z.new_zeros(1)  # chunked_linear reads a state's normaliser only when it normalises
    Z = chunked_linear(ones_q, ones_k, e, state0=(z[:, :, None, :], unused), **kw)
    seen = Z > 0
    Zs = torch.where(seen, Z, torch.ones_like(Z))
    logits = chunked_linear(qf, kf, e, state0=(mem_k.transpose(-1, -2), unused), **kw) / Zs / math.sqrt(q.shape[-1])
    p = torch.softmax(logits, dim=-1)
    read = torch.where(seen, p / Zs, torch.zeros_like(p))
    out = chunked_linear(read, e, vf, state0=(mem_v, unused), **kw).to(q.dtype)
    et = e.transpose(-1, -2)
    return out, mem_k + et @ kf, mem_v + et @ vf, z + e.sum(2)


def abc_segmented(q, k, v, s, *, chunk, segment=SEGMENT, fault: str | None = None):
    """Causal self-attention ABC (``offset`` 0, ``Lq == Lk``) in segments of ``segment`` tokens carrying the
    slot sums between them: the same operator and the same chunked passes as :func:`abc_chunked`, whose
    fp32 copies of q, k, v, controls, scores [L/chunk, chunk, chunk] and slot weights for the whole sequence
    were kept for the backward (abc's fwd_bwd `oom` at 1M tokens on the H200, 113 GiB in its fwd). With
    gradients each segment runs under a checkpoint (it keeps its inputs, which are views, and the entering
    sums [B, H, n, d]; the rest is recomputed segment by segment in the backward); the inputs are split with
    ``split`` (one gradient concatenation in the backward). ``segment`` should be a multiple of ``chunk`` (the
    chunks then fall where the whole form's do). ``fault="nocheckpoint"``: a deliberately broken variant (the
    segments' intermediates saved) for the tests' negative control."""
    if segment < 1:
        raise ValueError(f"abc_segmented: segment must be >= 1, got {segment}")
    batch, heads, _, dim = q.shape
    slots, dv = s.shape[-1], v.shape[-1]
    shift = s.float().amax(dim=2, keepdim=True).detach()  # the global per-slot maximum, as _controls
    mem_k = q.new_zeros(batch, heads, slots, dim, dtype=torch.float32)
    mem_v = q.new_zeros(batch, heads, slots, dv, dtype=torch.float32)
    z = q.new_zeros(batch, heads, slots, dtype=torch.float32)
    train = (torch.is_grad_enabled() and fault != "nocheckpoint" and q.shape[2] > segment
             and any(t.requires_grad for t in (q, k, v, s)))  # one segment: nothing to gain, no recomputation
    outs = []
    for parts in zip(*(t.split(segment, dim=2) for t in (q, k, v, s))):
        if train:
            out, mem_k, mem_v, z = checkpoint(_segment, *parts, shift, mem_k, mem_v, z, chunk, use_reentrant=False)
        else:
            out, mem_k, mem_v, z = _segment(*parts, shift, mem_k, mem_v, z, chunk)
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def abc_reference(q, k, v, s, *, causal, offset):
    heads = q.shape[1]
    k, v = expand_heads(k, heads), expand_heads(v, heads)
    e = _controls(s).to(q.dtype)
    if causal:
        visible = causal_visible(q.shape[2], k.shape[2], offset, q.device).to(q.dtype)
    else:
        visible = q.new_ones(q.shape[2], k.shape[2])
    mem_k = torch.einsum("ij,bhjn,bhjd->bhind", visible, e, k)  # Σ_j e_j ⊗ k_j over the visible keys
    mem_v = torch.einsum("ij,bhjn,bhjd->bhind", visible, e, v)
    Z = torch.einsum("ij,bhjn->bhin", visible, e)[..., None]
    seen = Z > 0
    Zs = torch.where(seen, Z, torch.ones_like(Z))
    mem_k, mem_v = mem_k / Zs, mem_v / Zs
    p = torch.softmax((mem_k @ q[..., None])[..., 0] / math.sqrt(q.shape[-1]), dim=-1)
    out = (p[..., None] * mem_v).sum(-2)
    return torch.where(seen.any(-2), out, torch.zeros_like(out))


def abc_rows(q, k, v, s, rows, *, causal, offset, chunk=ROWS_CHUNK, carry=True):
    """The reference on query rows ``rows`` only (``[B, H, len(rows), d]``, fp32), for long cases: the three
    unnormalised linear attentions of :func:`abc_chunked` (``Σ e⊗k`` read by ``q``, ``Σ e`` and ``Σ e⊗v`` read by
    the slot weights) each streamed over the keys by ``common.streamed_rows`` with the prefix state carried;
    the controls ``e`` are made per key chunk (shifted by the global per-slot maximum, as the full forms).
    Extra memory O(r · chunk + chunk · n + n · d) per (batch, head). ``carry=False``: a broken variant (the
    state is not carried between chunks) for the tests' negative control."""
    heads = q.shape[1]
    rows = rows.to(q.device).long()
    seq_kv = k.shape[2]
    last = last_keys(rows, causal=causal, offset=offset, seq_kv=seq_kv)
    shift = s.float().amax(dim=2, keepdim=True)  # [B, H, 1, n]

    def controls(start, stop):
        return torch.exp(s[:, :, start:stop].float() - shift)

    def keys(start, stop):
        return expand_heads(k[:, :, start:stop], heads).float()

    def values(start, stop):
        return expand_heads(v[:, :, start:stop], heads).float()

    def stream(fq, key_chunk):
        return common.streamed_rows(fq, key_chunk, seq_kv, last, chunk=chunk, normalize=False, carry=carry)

    qf = q[:, :, rows].float()
    Z = stream(qf.new_ones(*qf.shape[:3], 1),
               lambda a, b: (qf.new_ones(q.shape[0], heads, b - a, 1), controls(a, b), None))  # [B, H, r, n]
    seen = Z > 0
    Zs = torch.where(seen, Z, torch.ones_like(Z))
    logits = stream(qf, lambda a, b: (keys(a, b), controls(a, b), None)) / Zs / math.sqrt(q.shape[-1])
    p = torch.softmax(logits, dim=-1)
    read = torch.where(seen, p / Zs, torch.zeros_like(p))
    out = stream(read, lambda a, b: (controls(a, b), values(a, b), None))
    return torch.where(seen.any(-1, keepdim=True), out, torch.zeros_like(out))


def abc_decode() -> RecurrentDecode:
    """State ``(Σ e⊗k, Σ e⊗v, Σ e, m)`` with ``e = exp(s − m)`` and ``m`` the running per-slot maximum of the
    scores seen (the shift cancels in the read, as the global one of the other forms does). A step reads the
    newest token's scores only and rescales the sums when ``m`` grows: O(n·d) per head whatever the context.
    (The step shifted by ``_controls`` over the whole score sequence before: O(L) a step, the H200's abc decode
    grew from 0.22 ms at 4K to 6.46 ms at 1M, ``results/linear-summary.md``.)"""
    def prefill(q, k, v, s):
        past = k.shape[2] - 1
        heads = q.shape[1]
        sp = s[:, :, :past].float()
        m = sp.amax(dim=2) if past else sp.new_zeros(sp.shape[0], sp.shape[1], sp.shape[3])
        e = torch.exp(sp - m[:, :, None])
        kf, vf = expand_heads(k, heads)[:, :, :past].float(), expand_heads(v, heads)[:, :, :past].float()
        return (e.transpose(-1, -2) @ kf, e.transpose(-1, -2) @ vf, e.sum(2), m)

    def step(state, q, k, v, s):
        mem_k, mem_v, z, m = state
        last = k.shape[2] - 1
        heads = q.shape[1]
        st = s[:, :, last].float()  # [B, H, n]: the newest token's slot scores
        m_new = torch.maximum(m, st)
        shrink, e = torch.exp(m - m_new), torch.exp(st - m_new)
        kt, vt = expand_heads(k, heads)[:, :, last].float(), expand_heads(v, heads)[:, :, last].float()
        mem_k = mem_k * shrink[..., None] + e[..., None] * kt[:, :, None, :]
        mem_v = mem_v * shrink[..., None] + e[..., None] * vt[:, :, None, :]
        z = z * shrink + e
        logits = (mem_k @ q[:, :, -1].float()[..., None])[..., 0] / z / math.sqrt(q.shape[-1])
        p = torch.softmax(logits, dim=-1)
        return ((p / z)[:, :, None, :] @ mem_v).to(v.dtype)

    return RecurrentDecode(prefill=prefill, step=step,
                           state_bytes=lambda st: sum(t[0].numel() * t.element_size() for t in st))


@register_method("abc", Capabilities(family="linear", exact=False, masks=LINEAR_MASKS, cross=True, gqa=True,
                                      backward=True, decode=True),
                 options=("slots", "chunk", "segment", "reference_naive_max", "reference_stream_chunk"))
def build_abc(ctx):
    """ABC: n bounded memory slots written under control scores, read by softmax over slots (chunked)."""
    causal, offset = mask_mode(ctx)
    case = ctx.case
    slots = param_int(ctx, "slots", 64, minimum=1, maximum=4096)
    chunk = param_int(ctx, "chunk", 128, minimum=1, maximum=4096)
    segment = param_int(ctx, "segment", SEGMENT, minimum=0)  # 0: the whole sequence at once (the form before)
    if segment % chunk:
        raise ValueError(f"method_options.abc.segment: must be 0 or a multiple of chunk ({chunk}), got {segment}")
    naive_max = param_int(ctx, "reference_naive_max", 1 << 26)
    stream = param_int(ctx, "reference_stream_chunk", ROWS_CHUNK)

    def reference(q, k, v, s, rows=None):
        if rows is not None:  # a long case's sampled rows, streamed over the keys (forward only)
            return abc_rows(q, k, v, s, rows, causal=causal, offset=offset, chunk=stream).to(q.dtype)
        if q.shape[1] * q.shape[2] * slots * q.shape[-1] <= naive_max:
            return abc_reference(q, k, v, s, causal=causal, offset=offset)
        return abc_chunked(q, k, v, s, causal=causal, offset=offset, chunk=max(1, chunk // 2))

    def fast(q, k, v, s):
        if segment and causal and offset == 0 and q.shape[2] == k.shape[2]:
            return abc_segmented(q, k, v, s, chunk=chunk, segment=segment)
        return abc_chunked(q, k, v, s, causal=causal, offset=offset, chunk=chunk)

    return Prepared(fn=fast, reference=reference,
                    extras={"s": Extra(shape=(case.batch, case.heads_q, case.seq_kv, slots), dtype="float32")},
                    decode=abc_decode() if causal else None, softmax_comparable=False)
