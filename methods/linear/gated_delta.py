"""Gated DeltaNet (Yang, Kautz, Hatamizadeh, arXiv:2412.06464) and its special cases, own implementation:

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   o_t = scale · S_tᵀ q_t,   α_t = exp(g_t)

with the state ``S`` [d_k, d_v], q and k ℓ2-normalised inside the method (as ``use_qk_l2norm``), scale
1/√d. ``delta_rule``: α = 1 (no gate). ``simple_gla``: no delta term (``S_t = α_t S_{t−1} + k_t v_tᵀ``,
q and k not normalised), the scalar-gated linear attention of fla's ``chunk_simple_gla``.

The gate ``g`` (log space, [B, H, L], ``Extra(init="logsigmoid")``) and the write strength ``beta``
([B, H, L] in (0, 1), ``Extra(init="uniform")``) are extra inputs (in a layer they come from the hidden
states); both get gradients.

Forms: :func:`naive_recurrence` (the token loop, fp32: the reference up to ``reference_naive_max_len``
tokens; above that the reference is the chunked form in fp32 with half the chunk), :func:`chunked` (the
WY form: per chunk of C tokens, with cumulative log-decays γ, the unit lower-triangular system
``(I + diag(β)(exp(γ_r−γ_i) k_r·k_i)_{i<r}) [U | W] = diag(β) [V | diag(e^γ) K]`` is solved for all chunks
at once; a loop over chunks then carries the state: ``N = U − W S``, ``O = diag(e^γ) Q S + (e^(γ_r−γ_i) q_r·k_i)_{i≤r} N``,
``S ← e^(γ_C) S + (e^(γ_C−γ) ⊙ K)ᵀ N``), and a recurrent decode step with an O(d_k · d_v) fp32 state.
Every exponent is a difference ``γ_r − γ_i ≤ 0``, so no decay underflows into a ratio of tiny numbers.
The chunked form computes in fp32; its inter-chunk loop makes it launch-bound at short lengths. The loop
has a hand-written backward (:class:`_ChunkStates`: it keeps the stacked states only, and its time is linear
in the length; autograd through the loop was quadratic). Its memory is O(L) with a large constant (measured
by ``scripts/linear_memory.py`` at d = 128, chunk 64, bf16 inputs: ~6.9 KB per token per head at the forward's
peak, ~12.6 KB over fwd_bwd, ~8.5 KB saved for the backward: the WY pieces, the [C, C] decay and score
blocks, one d x d state per chunk), so long sequences run in segments (``segment``, :func:`segmented`): the
state carried across, each segment checkpointed in training, the working memory one segment's.

``simple_gla_triton`` (registered at the end of this file) is ``simple_gla``'s operator through own chunked
Triton kernels (``gla_triton.py``, forward and backward), gated against ``simple_gla``'s reference; causal
self-attention only, CUDA or the Triton interpreter.

Causal only (a recurrence); queries aligned bottom-right (decode: one query after the cache).
Class N (a different operator): no ``approx_err``. Hyper-parameters: ``chunk`` (default 64), ``segment``
(``'auto'``, the default: unsegmented up to 128K keys, 64K-token segments above; 0: off; or tokens >= chunk;
see :func:`segment_tokens`; the timed form, the decode prefill and the state scan's pieces),
``reference_naive_max_len`` (default 4096), ``reference_stream_chunk`` (keys per step of the reference's
``rows=`` form, which the case runner gates long cases on: :func:`gated_rows` for simple_gla and
simple_gla_triton, :func:`delta_rows` for the delta rules). The delta rules' state update
``α(I − β k kᵀ)S + β k vᵀ`` is not a sum over keys, so their rows form still runs every token through the
state (the chunked form, piece by piece, the state carried between pieces: O(L · d²) time) but keeps memory
per piece and emits only the requested rows, forward only. ``impl`` (:func:`states_impl`): ``torch`` (the
default) or ``triton``: the loop over chunks (forward and its backward) through own Triton kernels
(``delta_triton.py``: one launch each way instead of a few per chunk), everything else unchanged, in the timed
form, the decode prefill and the state scan (the references stay PyTorch); with ``block_v`` (power of two
16..128, default 32), ``num_warps`` (default 4), ``dot_precision`` (``tf32``, the default, ``ieee``, or
``bf16``: the loop's dot operands and :func:`chunk_outputs`' matmul operands rounded to bf16, fp32
accumulation, the state carried in fp32, as fla's kernels; outside a bf16 case's gate it fails fp32's),
``num_stages`` (``auto``), ``outputs`` (``torch``, the default: :func:`chunk_outputs` in PyTorch; ``triton``: the
loop's forward kernel writes every chunk's outputs too) and ``chunk`` <= 256 (:func:`states_impl`); CUDA or
``TRITON_INTERPRET=1``, else the rows are ``unsupported``.
``solve`` (:func:`solve_choice`, independent of ``impl``): ``torch`` (the default,
``torch.linalg.solve_triangular`` on all chunks' systems at once), ``triton`` (the delta rules: each chunk's
``(I + A)⁻¹`` by an own Triton kernel, ``tril_triton.py``: forward substitution in registers, one program per
chunk, and a matmul) or ``fused`` (every WY piece, γ, the decays, ``attn``, ``qg``, ``kd``, ``last``, ``(I + A)⁻¹``,
U and W, and the inputs' fp32 conversion, ℓ2 normalisation and padding, by one own kernel per chunk,
``wy_triton.py``; backward through the PyTorch pieces, recomputed, or with ``wy_backward: triton``
(``chunk`` <= 64) by an own backward kernel per chunk; simple_gla too, without the delta term), in the same
places as ``impl``; ``chunk`` <= 128; CUDA or ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..contract import Extra, Prepared, RecurrentDecode, StateScan
from ..registry import Capabilities, Unsupported, register_method
from .common import STREAM_CHUNK, mask_mode, param_int, streamed_rows

VARIANTS = {
    # name: (gated, delta, normalise q/k)
    "gated_delta_rule": (True, True, True),
    "delta_rule": (False, True, True),
    "simple_gla": (True, False, False),
}


def _inputs(q, k, v, g, beta, gated: bool, delta: bool, normalize: bool):
    q, k, v = q.float(), k.float(), v.float()
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    g = g.float() if (gated and g is not None) else torch.zeros(k.shape[:3], device=k.device)
    beta = beta.float() if (delta and beta is not None) else torch.ones(k.shape[:3], device=k.device)
    return q, k, v, g, beta


def _align(q, k):
    """Queries bottom-right: pad q with zeros in front to the key length (outputs sliced back after)."""
    lead = k.shape[2] - q.shape[2]
    if lead < 0:
        raise Unsupported("seq_q > seq_kv: queries before the first key (top-left causal) are not supported")
    if lead:
        q = torch.cat([q.new_zeros(*q.shape[:2], lead, q.shape[-1]), q], dim=2)
    return q, lead


def naive_recurrence(q, k, v, g=None, beta=None, *, gated=True, delta=True, normalize=True, state0=None,
                     return_state=False, scale=None):
    """The token loop in fp32 (readable; O(L) Python steps). ``scale`` defaults to 1/√d."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, lead = _align(q, k)
    q, k, v, g, beta = _inputs(q, k, v, g, beta, gated, delta, normalize)
    batch, heads, length, dk = k.shape
    S = q.new_zeros(batch, heads, dk, v.shape[-1]) if state0 is None else state0.float()
    outs = []
    for t in range(length):
        kt, vt = k[:, :, t], v[:, :, t]
        S = torch.exp(g[:, :, t])[..., None, None] * S
        if delta:
            S = S - beta[:, :, t, None, None] * kt[..., :, None] * (kt[..., None, :] @ S)
        S = S + beta[:, :, t, None, None] * kt[..., :, None] * vt[..., None, :]
        outs.append(scale * (q[:, :, t, None, :] @ S)[:, :, 0])
    out = torch.stack(outs, dim=2)[:, :, lead:]
    return (out, S) if return_state else out


def chunk_pieces(q, k, v, g, beta, *, delta: bool, chunk: int, solve: str = "torch"):
    """Per-chunk quantities of the WY form, for all chunks at once (inputs already fp32, normalised, padded
    to a multiple of ``chunk``): ``qg``, ``attn``, ``U``, ``W`` (None without the delta term), ``kd``,
    ``last`` (see the module docstring).

    ``solve`` (the delta term's unit lower-triangular systems): ``torch`` (the default:
    ``torch.linalg.solve_triangular``), ``triton`` (``T = (I + A)⁻¹`` by the own kernel,
    :func:`tril_triton.tril_inverse`, then ``T @ rhs``) or ``fused`` (all six pieces by one kernel,
    :func:`wy_triton.wy_pieces`, with or without the delta term; its backward recomputes them here with
    ``torch``); the Triton ones on CUDA or with ``TRITON_INTERPRET=1``. The same result up to float rounding,
    gradients included."""
    fused = fused_options(solve)
    if solve not in SOLVES and fused is None:
        raise ValueError(f"chunk_pieces: solve must be one of {SOLVES}, got {solve!r}")
    if fused is not None:  # every piece by one kernel (wy_triton.py); its backward: this code recomputed, or a kernel
        from .wy_triton import wy_pieces

        return wy_pieces(q, k, v, g, beta, delta=delta, chunk=chunk, **fused)
    batch, heads, length, dk = k.shape
    dv = v.shape[-1]
    n = length // chunk
    qc, kc, vc = (t.view(batch, heads, n, chunk, t.shape[-1]) for t in (q, k, v))
    gam = g.view(batch, heads, n, chunk).cumsum(-1)  # γ_r within each chunk
    bc = beta.view(batch, heads, n, chunk)
    diff = gam[..., :, None] - gam[..., None, :]  # γ_r − γ_i
    incl = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    decay = torch.exp(diff.masked_fill(~incl, float("-inf")))  # e^(γ_r−γ_i) for i <= r, else 0
    attn = (qc @ kc.transpose(-1, -2)) * decay
    qg = qc * torch.exp(gam)[..., None]
    kd = kc * torch.exp(gam[..., -1:] - gam)[..., None]
    last = torch.exp(gam[..., -1])  # [B, H, N]
    if delta:
        strict = decay.masked_fill(torch.eye(chunk, dtype=torch.bool, device=k.device), 0.0)
        below = bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * strict  # A: zero on and above the diagonal
        rhs = bc[..., None] * torch.cat([vc, kc * torch.exp(gam)[..., None]], dim=-1)
        if solve == "triton":  # the kernel's unmasked backward is exact here: strict is 0 where A is (tril_triton)
            from .tril_triton import tril_inverse

            sol = tril_inverse(below) @ rhs
        else:
            lower = torch.eye(chunk, device=k.device) + below
            sol = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        U, W = sol[..., :dv], sol[..., dv:]
    else:
        U, W = vc * bc[..., None], None
    return qg, attn, U, W, kd, last


def _state_loop(U, W, kd, last, state0):
    """The chunk loop without autograd: the states entering the chunks, written into one [B, H, N, dk, dv]
    tensor (not a list stacked after: that held them twice), and the final state."""
    batch, heads, n = U.shape[:3]
    states = state0.new_empty(batch, heads, n, *state0.shape[-2:])
    S = state0
    for c in range(n):
        states[:, :, c] = S
        new = U[:, :, c] if W is None else U[:, :, c] - W[:, :, c] @ S
        S = last[:, :, c, None, None] * S + kd[:, :, c].transpose(-1, -2) @ new
    return states, S


class _ChunkStates(torch.autograd.Function):
    """:func:`chunk_states` with a hand-written backward: the reverse loop over chunks,

        dS_c = e^(γ_C) dS_{c+1} − Wᵀ (kd dS_{c+1}) + dstates_c,   dU_c = kd dS_{c+1},   dW_c = −dU_c S_cᵀ,
        dkd_c = N_c dS_{c+1}ᵀ (N_c = U_c − W_c S_c, recomputed),   d(e^(γ_C))_c = ⟨S_c, dS_{c+1}⟩,

    saving only the inputs and the stacked states. Autograd through the Python loop kept every step's state,
    a contiguous copy of every step's ``W_c`` and ``kd_c`` besides (about 2 KB per token per head at d = 128),
    and its backward of each step's ``U[:, :, c]`` wrote a zero tensor of ``U``'s full size: O(N²) work, the
    fwd_bwd time growing with the square of the length (131K tokens: 6.5 s on the H200, 256K timed out)."""

    @staticmethod
    def forward(ctx, U, W, kd, last, state0):
        states, S = _state_loop(U, W, kd, last, state0)
        ctx.save_for_backward(U, W, kd, last, states)
        ctx.set_materialize_grads(False)
        return states, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dstates, dS):
        U, W, kd, last, states = ctx.saved_tensors
        need_u, need_w, need_kd, need_last, need_s0 = ctx.needs_input_grad
        n = U.shape[2]
        dU = torch.empty_like(U) if need_u else None
        dW = torch.empty_like(W) if (need_w and W is not None) else None
        dkd = torch.empty_like(kd) if need_kd else None
        dlast = torch.empty_like(last) if need_last else None
        if dS is None:
            dS = torch.zeros_like(states[:, :, 0])
        for c in reversed(range(n)):
            S_c = states[:, :, c]
            dnew = kd[:, :, c] @ dS  # [B, H, C, dv]
            if dU is not None:
                dU[:, :, c] = dnew
            if dkd is not None:
                new = U[:, :, c] if W is None else U[:, :, c] - W[:, :, c] @ S_c
                dkd[:, :, c] = new @ dS.transpose(-1, -2)
            if dlast is not None:
                dlast[:, :, c] = (S_c * dS).sum((-1, -2))
            before = last[:, :, c, None, None] * dS
            if W is not None:
                if dW is not None:
                    dW[:, :, c] = -(dnew @ S_c.transpose(-1, -2))
                before = before - W[:, :, c].transpose(-1, -2) @ dnew
            if dstates is not None:
                before = before + dstates[:, :, c]
            dS = before
        return dU, dW, dkd, dlast, dS if need_s0 else None


def chunk_states(U, W, kd, last, state0):
    """The loop over chunks: the state entering each chunk [B, H, N, dk, dv] and the final state
    (differentiable in every input, ``state0`` included; see :class:`_ChunkStates`)."""
    return _ChunkStates.apply(U, W, kd, last, state0)


def chunk_outputs(qg, attn, U, W, states, bf16: bool = False):
    """Every chunk's outputs from the state entering it, all chunks at once: [B, H, N, C, dv] (fp32).

    ``bf16`` (``dot_precision: bf16`` of ``impl: triton``, as fla's output kernels): the three matmuls take
    bf16 operands (each rounded to nearest even from fp32; the states stay fp32 in memory and are rounded
    here only as operands), the products accumulated in fp32 by the bf16 GEMM, its result rounded once to
    bf16 and taken back to fp32, where ``U − W S`` and the sum of the two terms are formed. Their backward
    runs through the same bf16 matmuls (autograd), the gradients taken back to fp32 at the casts."""
    if not bf16:
        new = U if W is None else U - W @ states
        return qg @ states + attn @ new
    sb = states.bfloat16()
    new = U if W is None else U - (W.bfloat16() @ sb).float()
    return (qg.bfloat16() @ sb).float() + (attn.bfloat16() @ new.bfloat16()).float()


def _prepare(q, k, v, g, beta, gated, delta, normalize, chunk):
    q, lead = _align(q, k)
    q, k, v, g, beta = _inputs(q, k, v, g, beta, gated, delta, normalize)
    batch, heads, length, _ = k.shape
    pad = -length % chunk
    if pad:  # padded tokens: k = v = 0, g = 0, beta = 0 -> no write, no decay
        q, k, v = (torch.cat([t, t.new_zeros(batch, heads, pad, t.shape[-1])], 2) for t in (q, k, v))
        g, beta = (torch.cat([t, t.new_zeros(batch, heads, pad)], 2) for t in (g, beta))
    return q, k, v, g, beta, lead, length


def chunked(q, k, v, g=None, beta=None, *, gated=True, delta=True, normalize=True, chunk=64, state0=None,
            return_state=False, scale=None, segment=0, carry=True, states_fn=None, solve="torch",
            bf16_outputs=False):
    """The WY chunked form (fp32), see the module docstring. ``scale`` defaults to 1/√d. ``solve``: the
    triangular solve of :func:`chunk_pieces` (``torch`` or ``triton``), or ``fused``: every piece, the inputs'
    conversion, normalisation and padding included, by one kernel (:func:`wy_triton.wy_pieces`).

    ``states_fn``: the loop over chunks, ``(U, W, kd, last, state0) -> (states, final state)``; None (the
    default) is :func:`chunk_states` (PyTorch); ``impl: triton`` passes :func:`delta_triton.chunk_states`
    with its options bound. Everything else (the pieces, the outputs, the segments) is the same code, except
    where ``states_fn`` carries an ``outputs_fn`` attribute (``outputs: triton``, :func:`states_impl`):
    ``(qg, attn, U, W, kd, last, state0) -> (outputs [B, H, N, C, dv], final state)``, the loop and the
    outputs in one kernel (:func:`delta_triton.chunk_forward`), and :func:`chunk_outputs` is not called.
    ``bf16_outputs``: :func:`chunk_outputs` with bf16 operands (``dot_precision: bf16``; default fp32).

    ``segment`` (tokens, 0 = off): above that many keys the sequence runs segment by segment through
    :func:`segmented` (the state carried across; in training each segment checkpointed), with the same
    outputs and gradients up to float rounding. ``carry=False`` (each segment starts from a zero state) is a
    deliberately broken variant for the tests' negative control."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if segment and k.shape[2] > segment:
        return segmented(q, k, v, g, beta, gated=gated, delta=delta, normalize=normalize, chunk=chunk,
                         state0=state0, return_state=return_state, scale=scale, segment=segment, carry=carry,
                         states_fn=states_fn, solve=solve, bf16_outputs=bf16_outputs)
    out_dtype = v.dtype
    fused = fused_options(solve)
    if fused is not None:  # the kernel reads the raw inputs: conversion, normalisation and padding fused in
        from .wy_triton import wy_pieces

        q, lead = _align(q, k)
        length = k.shape[2]
        qg, attn, U, W, kd, last = wy_pieces(q, k, v, g if gated else None, beta if delta else None, delta=delta,
                                             chunk=chunk, normalize=normalize, **fused)
    else:
        q, k, v, g, beta, lead, length = _prepare(q, k, v, g, beta, gated, delta, normalize, chunk)
        qg, attn, U, W, kd, last = chunk_pieces(q, k, v, g, beta, delta=delta, chunk=chunk, solve=solve)
    batch, heads, _, dk = k.shape
    S0 = k.new_zeros(batch, heads, dk, v.shape[-1], dtype=torch.float32) if state0 is None else state0.float()
    outputs_fn = getattr(states_fn, "outputs_fn", None)
    if outputs_fn is not None:  # outputs: triton, the loop's kernel writes every chunk's outputs too
        out, S = outputs_fn(qg, attn, U, W, kd, last, S0)
    else:
        states, S = (chunk_states if states_fn is None else states_fn)(U, W, kd, last, S0)
        out = chunk_outputs(qg, attn, U, W, states, bf16=bf16_outputs)
    out = out.reshape(batch, heads, -1, v.shape[-1])
    out = (scale * out[:, :, lead:length]).to(out_dtype)
    return (out, S) if return_state else out


def _segment_step(q, k, v, g, beta, state0, kw):
    return chunked(q, k, v, g, beta, state0=state0, return_state=True, **kw)


def segmented(q, k, v, g=None, beta=None, *, segment: int, gated=True, delta=True, normalize=True, chunk=64,
              state0=None, return_state=False, scale=None, carry=True, states_fn=None, solve="torch",
              bf16_outputs=False):
    """:func:`chunked` one segment of ``segment`` tokens at a time: each segment is the chunked form started
    from the state carried out of the segment before (fp32 [B, H, dk, dv]), so the working memory (the WY
    pieces, the per-chunk states, and in training everything autograd saves) is one segment's, whatever the
    length. With gradients, each segment runs under ``torch.utils.checkpoint`` (non-reentrant): between the
    forward and the backward only the segment inputs (views of q, k, v, g, beta) and the carried states are
    kept, and the backward recomputes one segment's forward at a time (the cost: one more forward).
    Segments need not align with the chunks: a segment's last chunk is padded with tokens that neither write
    nor decay, so the result equals the unsegmented one up to float rounding. Queries aligned bottom-right
    (zero queries in front, sliced off after). ``states_fn``, ``solve``, ``bf16_outputs``: as :func:`chunked`'s,
    used in every segment."""
    if segment < 1:
        raise ValueError(f"segmented: segment must be >= 1, got {segment}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, lead = _align(q, k)
    length = k.shape[2]
    kw = dict(gated=gated, delta=delta, normalize=normalize, chunk=chunk, scale=scale, states_fn=states_fn,
              solve=solve, bf16_outputs=bf16_outputs)
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, beta, state0))
    out = None if train else v.new_empty(*v.shape[:3], v.shape[-1])
    pieces = []
    S = state0
    for start in range(0, length, segment):
        stop = min(start + segment, length)
        args = [None if t is None else t[:, :, start:stop] for t in (q, k, v, g, beta)]
        if train:
            o, S_out = checkpoint(_segment_step, *args, S, kw, use_reentrant=False, preserve_rng_state=False)
            pieces.append(o)
        else:
            o, S_out = _segment_step(*args, S, kw)
            out[:, :, start:stop] = o
            del o
        S = S_out if carry else None
    if train:
        out = torch.cat(pieces, dim=2)
    out = out[:, :, lead:]
    return (out, S) if return_state else out


def gated_rows(q, k, v, g, rows, *, chunk: int = STREAM_CHUNK, scale=None):
    """``simple_gla``'s operator (no delta term, q and k not normalised) on query rows ``rows`` only
    (``[B, H, len(rows), dv]``, ``v``'s dtype): the keys streamed in chunks by :func:`common.streamed_rows`
    with the decayed state carried, queries aligned bottom-right. The ``rows=`` form of the reference that long
    cases are gated on. The delta rules' is :func:`delta_rows` (their state update is not a sum over keys)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = rows.to(q.device).long()
    last = rows + (k.shape[2] - q.shape[2])
    if last.numel() and int(last.min()) < 0:
        raise Unsupported("seq_q > seq_kv: queries before the first key (top-left causal) are not supported")

    def key_chunk(start, stop):
        return k[:, :, start:stop], v[:, :, start:stop], None if g is None else g[:, :, start:stop]

    out = streamed_rows(q[:, :, rows], key_chunk, k.shape[2], last, chunk=chunk, normalize=False)
    return (scale * out).to(v.dtype)


def delta_rows(q, k, v, g, beta, rows, *, gated: bool, chunk: int, stream: int = STREAM_CHUNK, scale=None,
               carry: bool = True):
    """The delta rules' operator (``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, q and k
    ℓ2-normalised, ``o_t = scale · S_tᵀ q_t``; α ≡ 1 unless ``gated``) on query rows ``rows`` only
    (``[B, H, len(rows), dv]``, ``v``'s dtype), queries aligned bottom-right: the ``rows=`` form of the
    reference that long cases are gated on.

    The state is not a sum over keys, so every token still passes through it (O(L · d²) time): the keys are
    walked in pieces of ``stream`` tokens, each run through :func:`chunked` (the WY form, fp32, inner chunk
    ``chunk``) from the state carried out of the piece before; only that state crosses pieces, and a piece's
    outputs are computed for its queries that are requested (the others are zero queries) and picked there.
    Extra memory O(stream · (d + chunk) + stream / chunk · d_k · d_v) per (batch, head), whatever the length.
    Keys past the last requested row are not read. ``carry=False`` (each piece starts from a zero state) is a
    deliberately broken variant for the tests' negative control."""
    if stream < 1:
        raise ValueError(f"delta_rows: stream must be >= 1, got {stream}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = rows.to(q.device).long()
    lead = k.shape[2] - q.shape[2]
    pos = rows + lead  # each row's position among the keys (its last key)
    if lead < 0 or (pos.numel() and int(pos.min()) < 0):
        raise Unsupported("seq_q > seq_kv: queries before the first key (top-left causal) are not supported")
    batch, heads, _, dk = k.shape
    dv = v.shape[-1]
    out = torch.zeros(batch, heads, rows.numel(), dv, device=q.device, dtype=torch.float32)
    end = int(pos.max()) + 1 if pos.numel() else 0
    S = None
    for start in range(0, end, stream):
        stop = min(start + stream, end)
        here = ((pos >= start) & (pos < stop)).nonzero().squeeze(1)  # rows whose position is in this piece
        qs = q.new_zeros(batch, heads, stop - start, dk, dtype=torch.float32)
        qs[:, :, pos[here] - start] = q[:, :, rows[here]].float()
        gs = g[:, :, start:stop].float() if (gated and g is not None) else None
        bs = None if beta is None else beta[:, :, start:stop].float()
        piece, S_out = chunked(qs, k[:, :, start:stop].float(), v[:, :, start:stop].float(), gs, bs, gated=gated,
                               delta=True, normalize=True, chunk=chunk, state0=S, return_state=True, scale=scale)
        if here.numel():
            out[:, :, here] = piece[:, :, pos[here] - start]
        S = S_out if carry else None
    return out.to(v.dtype)


def recurrent_decode(gated: bool, delta: bool, normalize: bool, chunk: int, segment=0,
                     states_fn=None, solve="torch") -> RecurrentDecode:
    """``segment``: the prefill's (``'auto'`` or tokens, :func:`segment_tokens`); the step is one token.
    ``states_fn``, ``solve``: the prefill's chunk loop and triangular solve (:func:`chunked`'s; the step is
    PyTorch either way)."""

    def prefill(q, k, v, g=None, beta=None):
        past = k.shape[2] - 1
        gp = g[..., :past] if g is not None else None
        bp = beta[..., :past] if beta is not None else None
        _, S = chunked(k[:, :, :past], k[:, :, :past], v[:, :, :past], gp, bp, gated=gated, delta=delta,
                       normalize=normalize, chunk=chunk, return_state=True, segment=segment_tokens(segment, past),
                       states_fn=states_fn, solve=solve)
        return S

    def step(S, q, k, v, g=None, beta=None):
        last = k.shape[2] - 1
        qt, kt, vt = q[:, :, -1].float(), k[:, :, last].float(), v[:, :, last].float()
        if normalize:
            qt, kt = F.normalize(qt, dim=-1), F.normalize(kt, dim=-1)
        state = S * torch.exp(g[:, :, last].float())[..., None, None] if gated else S
        b = beta[:, :, last].float()[..., None, None] if delta else 1.0
        if delta:
            state = state - b * kt[..., :, None] * (kt[..., None, :] @ state)
        state = state + b * kt[..., :, None] * vt[..., None, :]
        out = (q.shape[-1] ** -0.5) * (qt[:, :, None, :] @ state)
        return out.to(v.dtype)

    return RecurrentDecode(prefill=prefill, step=step, state_bytes=lambda S: S[0].numel() * S.element_size())


def gate_extras(case, gated: bool, delta: bool) -> dict:
    shape = (case.batch, case.heads_q, case.seq_kv)
    extras = {}
    if gated:
        extras["g"] = Extra(shape=shape, init="logsigmoid", dtype="float32")
    if delta:
        extras["beta"] = Extra(shape=shape, init="uniform", dtype="float32")
    return extras


AUTO_SEGMENT_ABOVE = 131072  # 'auto': unsegmented up to 128K keys ...
AUTO_SEGMENT = 65536  # ... and 64K-token segments above


def reference_segment(length: int) -> int:
    """The segments of the references' chunked form (fp32, half the method's chunk): ``'auto'``'s, whatever the
    method's own ``segment`` (the same outputs up to rounding, memory one segment's). Unsegmented, the decode
    sweep's reference at 1M asked for 32 GiB more and was an `oom` row (results/h200-linear-decode)."""
    return segment_tokens("auto", length)


def param_segment(ctx, chunk: int):
    """``method_options.<method>.segment``: ``'auto'`` (the default), 0 (off) or a segment length in tokens
    (an integer >= ``chunk``); ValueError naming the field otherwise. See :func:`segment_tokens`."""
    value = ctx.param("segment", "auto")
    field = f"method_options.{ctx.case.method}.segment"
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or (value != 0 and value < chunk) or value < 0:
        raise ValueError(f"{field}: must be 'auto', 0 (off) or a segment length in tokens >= chunk ({chunk}), "
                         f"got {value!r}")
    return value


def segment_tokens(option, length: int) -> int:
    """The segment length for ``length`` keys (0: unsegmented). ``'auto'``: off up to ``AUTO_SEGMENT_ABOVE``
    (128K) keys, ``AUTO_SEGMENT`` (64K) tokens above. Why: up to 128K the unsegmented form fits (16 heads,
    d = 128: ~15 GB forward, ~29 GB fwd_bwd on the H200) and is what the committed rows measured, so they stay
    as they are; above, its memory grows past one GPU (1M tokens: ~110 GB forward, over 200 GB fwd_bwd), while
    a 64K segment's working set is a fixed ~7 GB forward / ~13 GB for a segment's recomputed backward at 16
    heads, and 64K is a multiple of every power-of-two chunk up to 1024 (segment seams fall on chunk seams)
    and long enough (1024 chunks of 64) that the per-segment overhead (one more Python step, and in training
    the checkpoint's recomputed forward: about one forward more per fwd_bwd) is spread thin. Memory scales
    with batch x heads too: with many more heads, set an explicit smaller ``segment``."""
    if option == "auto":
        return AUTO_SEGMENT if length > AUTO_SEGMENT_ABOVE else 0
    return int(option)


IMPLS = ("torch", "triton")
TRITON_ONLY = ("block_v", "num_warps", "dot_precision", "num_stages")  # options of impl: triton alone
OUTPUTS = ("torch", "triton")  # method_options.<variant>.outputs (impl: triton only; the variants, not lamamba)


def states_impl(ctx, chunk: int, default: str = "torch"):
    """``method_options.<method>.impl``: ``auto`` (the default of delta_rule, gated_delta_rule and simple_gla,
    ``default``: ``triton`` on a CUDA device where the kernels run, else ``torch``; lamamba's default stays
    ``torch``), ``torch`` (the chunk loop in PyTorch,
    :func:`chunk_states`) or ``triton`` (the loop through own Triton kernels, :mod:`delta_triton`, with
    ``block_v`` (power of two 16..128), ``num_warps`` (1, 2, 4, 8 or 16), ``dot_precision`` (``tf32``,
    ``ieee`` or ``bf16``; ``bf16`` also gives :func:`chunk_outputs` bf16 operands, see :func:`build_variant`)
    and ``num_stages``). Returns the ``states_fn`` for :func:`chunked` (None for ``torch``), a
    ``functools.partial`` whose ``keywords`` hold the options. ``outputs`` (``impl: triton`` only, else a
    ValueError naming it): ``torch`` (the default: :func:`chunk_outputs` in PyTorch from the stored states) or
    ``triton`` (the loop's forward kernel writes every chunk's outputs, :func:`delta_triton.chunk_forward`,
    with the same ``dot_precision``; its backward is the PyTorch :func:`chunk_outputs`' on the saved states
    and the loop's kernel; the partial then carries it as ``outputs_fn``; its forward launch takes
    ``num_warps`` / ``num_stages`` where given, else :data:`delta_triton.OUTPUT_DEFAULTS`: 8 warps, 1 stage).
    Not timed on the GPU yet. ``num_stages``: ``auto`` (2 up to head dim 128,
    1 above) or 1, 2, 3. Defaults:
    :data:`delta_triton.DEFAULTS` (block_v 32, 4 warps, tf32 dots: chosen offline for sm_90's shared memory
    and spills). Bad values: ValueError naming the field; with ``triton``, ``Unsupported`` (the case's
    row, with the reason) without CUDA or ``TRITON_INTERPRET=1``, or for head dims above 256. Never a silent
    fallback to the PyTorch loop."""
    from .common import param_choice
    from .linear_attn import triton_by_default

    method = ctx.case.method
    field = f"method_options.{method}"
    impl = param_choice(ctx, "impl", default, IMPLS + (("auto",) if default == "auto" else ()))
    if impl == "auto":
        impl = "triton" if triton_by_default(ctx.device) else "torch"
    # read only where given: lamamba shares this function without declaring the option (the registry checks reads)
    outputs = param_choice(ctx, "outputs", "torch", OUTPUTS) if "outputs" in ctx.params else "torch"
    if impl == "torch":
        if "outputs" in ctx.params:
            raise ValueError(f"{field}.outputs: applies to impl 'triton' only (the outputs are written by the "
                             f"Triton chunk-loop kernel; impl is 'torch')")
        for name in TRITON_ONLY:
            if name in ctx.params:
                raise ValueError(f"{field}.{name}: applies to impl 'triton' only (impl is 'torch')")
        return None
    from .delta_triton import DEFAULTS, PRECISIONS

    block_v = param_int(ctx, "block_v", DEFAULTS["block_v"], minimum=16, maximum=128, power_of_two=True)
    num_warps = param_choice(ctx, "num_warps", DEFAULTS["num_warps"], (1, 2, 4, 8, 16))
    precision = param_choice(ctx, "dot_precision", DEFAULTS["dot_precision"], PRECISIONS)
    num_stages = param_choice(ctx, "num_stages", "auto", ("auto", 1, 2, 3))
    if chunk > 256:
        raise ValueError(f"{field}.chunk: must be <= 256 with impl 'triton' (one chunk's tiles live in "
                         f"registers), got {chunk}")
    name = f"{method} with {field}.impl=triton"
    dims = {"head_dim": ctx.case.head_dim, "value head dim": ctx.head_dim_v}
    for what, dim in dims.items():
        if dim > 256:
            raise Unsupported(f"{name}: {what} {dim} > 256 (the state block lives in registers)")
    from .linear_attn import triton_runnable

    why = triton_runnable(ctx.device)
    if why:
        raise Unsupported(f"{name}: {why}")
    import functools

    from .delta_triton import chunk_states as triton_states

    fn = functools.partial(triton_states, block_v=block_v, num_warps=num_warps, dot_precision=precision,
                           num_stages=None if num_stages == "auto" else num_stages)
    if outputs == "triton":  # chunked() takes the outputs from the loop's kernel (delta_triton.chunk_forward)
        from .delta_triton import OUTPUT_DEFAULTS, chunk_forward

        # its forward launch: num_warps / num_stages where given, else the settings that fit sm_90 with the outputs
        fwd = dict(fwd_num_warps=num_warps if "num_warps" in ctx.params else OUTPUT_DEFAULTS["num_warps"],
                   fwd_num_stages=num_stages if num_stages != "auto" else OUTPUT_DEFAULTS["num_stages"])
        fn.outputs_fn = functools.partial(chunk_forward, **fn.keywords, **fwd)
    return fn


SOLVES = ("torch", "triton", "fused")
# the solves that run the fused kernel, and its backward (wy_triton._WYPieces): ``fused`` recomputes the PyTorch
# pieces; ``fused+triton_backward`` (what solve_choice returns for ``wy_backward: triton``) runs the backward kernel
FUSED = {"fused": "torch", "fused+triton_backward": "triton"}
WY_BACKWARDS = ("torch", "triton")
WY_PRECISIONS = ("tf32x3", "tf32", "ieee")  # the fused kernel's dots (wy_triton.PRECISIONS; default its DEFAULTS')


def fused_options(solve: str) -> dict | None:
    """The fused kernel's options for an internal ``solve`` (None: not a fused solve): ``backward`` from
    :data:`FUSED` and, after an ``@``, the kernel's ``dot_precision`` (``wy_precision``, :func:`solve_choice`:
    ``fused@tf32`` runs its dots in one tf32 product)."""
    base, _, precision = solve.partition("@")
    if base not in FUSED or (precision and precision not in WY_PRECISIONS):
        return None
    return {"backward": FUSED[base], **({"dot_precision": precision} if precision else {})}


def solve_choice(ctx, chunk: int, delta: bool, auto: bool = False) -> str:
    """``method_options.<method>.solve``: how :func:`chunk_pieces` builds the WY pieces, in the timed form, the
    decode prefill and the state scan (the references stay PyTorch); independent of ``impl``. The delta rules
    (delta_rule, gated_delta_rule): ``auto`` (the default: ``fused`` on a CUDA device where the kernel runs and
    ``chunk`` <= 64, else ``torch``; measured on the H200, results/linear-summary.md: 5.2 ms against PyTorch's
    ~55 ms at 32K tokens fwd), ``torch`` (PyTorch, the per-chunk unit lower-triangular
    systems by ``torch.linalg.solve_triangular``), ``triton`` (the same with the inverse by the own kernel,
    :mod:`tril_triton`, then a matmul) or ``fused`` (every piece by one own kernel per chunk, :mod:`wy_triton`,
    the inputs' conversion, normalisation and padding included; backward through the PyTorch pieces,
    recomputed). simple_gla (no triangular solve): ``fused`` only (its pieces by the same kernel without the
    delta term); no ``solve`` is its PyTorch pieces. Bad values: ValueError naming the field (an unknown value;
    ``torch`` or ``triton`` given to simple_gla; ``chunk`` > 128 with ``triton`` or ``fused``); with
    ``triton`` or ``fused``, ``Unsupported`` (the case's row, with the reason) without CUDA or
    ``TRITON_INTERPRET=1``. Never a silent fallback.

    ``method_options.<method>.wy_backward`` (with ``solve: fused`` only, else a ValueError naming it): the fused
    pieces' backward, ``torch`` (the default: the PyTorch pieces recomputed and backpropagated) or ``triton``
    (one backward kernel per chunk, :func:`wy_triton.pieces_backward`, ``chunk`` <= 32: at the default 64 the
    compiled kernel gave wrong gradients on the H200, see ``wy_triton.MAX_BACKWARD_CHUNK``; returned as the
    internal solve ``fused+triton_backward``). Timed at C = 64 only (h200-linear-delta-fused-v2: its fwd_bwd rows
    are not valid, the gate caught the gradients at 8K and 32K).

    ``method_options.<method>.wy_precision`` (with ``solve: fused`` only, else a ValueError naming it): the fused
    kernel's dots, ``auto`` (the default: ``tf32`` for bf16 / fp16 inputs, ``tf32x3`` for fp32), ``tf32x3``
    (three tf32 products, fp32-like), ``tf32`` (one product, ~1e-3 relative rounding; compiled for sm_90 at C = 64
    it holds 120 registers a thread against tf32x3's 231; on the H200 bf16 delta_rule fwd 5.19 / 20.5 / 170 ms at
    32K / 128K / 1M against tf32x3's 7.54 / 29.8 / 243, gated ok, results/h200-linear-delta-wytf32) or ``ieee``;
    returned as the internal solve ``<solve>@<precision>`` (:func:`fused_options`). The gate decides whether the
    rounding is acceptable on a case."""
    from .common import param_choice
    from .linear_attn import triton_by_default

    field = f"method_options.{ctx.case.method}"
    wy_backward = param_choice(ctx, "wy_backward", "torch", WY_BACKWARDS)
    wy_precision = param_choice(ctx, "wy_precision", "auto", ("auto",) + WY_PRECISIONS)
    if wy_precision == "auto":  # one tf32 product for 16-bit inputs (measured faster, gated ok), fp32-like else
        wy_precision = "tf32" if ctx.dtype in (torch.bfloat16, torch.float16) else "tf32x3"
    if not delta and "solve" not in ctx.params:
        solve = "torch"
    elif not delta:
        if ctx.params["solve"] != "fused":
            raise ValueError(f"{field}.solve: {ctx.case.method} has no triangular solve: only 'fused' (its chunk "
                             f"pieces by one own kernel) applies, got {ctx.params['solve']!r}")
        solve = "fused"
    else:
        solve = param_choice(ctx, "solve", "auto" if auto else "torch", SOLVES + (("auto",) if auto else ()))
        if solve == "auto":
            # the fused kernel where it was measured (C = 64, results/h200-linear-delta-fused-v2) and below
            solve = "fused" if triton_by_default(ctx.device) and chunk <= 64 else "torch"
    for name, what in (("wy_backward", "the fused pieces' backward"), ("wy_precision", "the fused kernel's dots")):
        if name in ctx.params and solve != "fused":
            given = ctx.params.get("solve", "auto" if auto else "torch")
            raise ValueError(f"{field}.{name}: applies to solve 'fused' only ({what}), got solve {given!r}"
                             + (f" (resolved to {solve!r} here)" if given != solve else ""))
    if solve == "torch":
        return solve
    if solve == "triton":
        from .tril_triton import MAX_CHUNK
    else:
        from .wy_triton import MAX_CHUNK

    if chunk > MAX_CHUNK:
        raise ValueError(f"{field}.chunk: must be <= {MAX_CHUNK} with solve '{solve}' (one chunk's [C, C] tiles "
                         f"live in registers), got {chunk}")
    if wy_backward == "triton":
        from .wy_triton import MAX_BACKWARD_CHUNK

        if chunk > MAX_BACKWARD_CHUNK:
            raise ValueError(f"{field}.chunk: must be <= {MAX_BACKWARD_CHUNK} with wy_backward 'triton' (at C = 64 "
                             f"the compiled backward kernel gave wrong gradients on the H200; "
                             f"wy_triton.MAX_BACKWARD_CHUNK), got {chunk}")
    from .linear_attn import triton_runnable

    why = triton_runnable(ctx.device)
    if why:
        raise Unsupported(f"{ctx.case.method} with {field}.solve={solve}: {why}")
    solve = "fused+triton_backward" if wy_backward == "triton" else solve
    return solve if wy_precision == "tf32x3" or solve not in FUSED else f"{solve}@{wy_precision}"


def build_variant(ctx, name: str, fast=None) -> Prepared:
    """Prepared for one variant; ``fast`` replaces the own chunked form (the fla adapters). ``impl``
    (:func:`states_impl`) picks the chunk loop and ``solve`` (:func:`solve_choice`) the triangular solve of the
    timed form, the decode prefill and the state scan; the references stay PyTorch. ``dot_precision: bf16``
    (``impl: triton``) rounds the operands of the loop's dots and of :func:`chunk_outputs`' matmuls to bf16
    (fp32 accumulation, the state fp32): one option for the chunk path's dots, as fla's kernels have them."""
    gated, delta, normalize = VARIANTS[name]
    causal, offset = mask_mode(ctx)
    if not causal or offset != ctx.case.seq_kv - ctx.case.seq_q:
        raise Unsupported(f"{ctx.case.method} is a causal recurrence aligned bottom-right only")
    chunk = param_int(ctx, "chunk", 64, minimum=1, maximum=1024)
    naive_max = param_int(ctx, "reference_naive_max_len", 4096, minimum=1)
    stream = param_int(ctx, "reference_stream_chunk", STREAM_CHUNK)
    segment = param_segment(ctx, chunk) if fast is None else 0
    states_fn = states_impl(ctx, chunk, default="auto") if fast is None else None
    solve = solve_choice(ctx, chunk, delta, auto=True) if fast is None else "torch"
    bf16_outputs = states_fn is not None and states_fn.keywords["dot_precision"] == "bf16"
    kw = dict(gated=gated, delta=delta, normalize=normalize)
    base_solve, _, wy_precision = solve.partition("@")
    resolved = {"impl": "triton" if states_fn is not None else "torch",
                "solve": "fused" if base_solve in FUSED else base_solve}  # the code paths `auto` chose
    if base_solve in FUSED:
        resolved["wy_precision"] = wy_precision or "tf32x3"

    def fn(q, k, v, g=None, beta=None):
        if fast is not None:
            return fast(q, k, v, g, beta)
        return chunked(q, k, v, g, beta, chunk=chunk, segment=segment_tokens(segment, k.shape[2]),
                       states_fn=states_fn, solve=solve, bf16_outputs=bf16_outputs, **kw)

    def reference(q, k, v, g=None, beta=None):
        if k.shape[2] <= naive_max:
            return naive_recurrence(q, k, v, g, beta, **kw).to(q.dtype)
        return chunked(q, k, v, g, beta, chunk=max(1, chunk // 2), segment=reference_segment(k.shape[2]), **kw)

    full_reference = reference

    def reference(q, k, v, g=None, beta=None, rows=None):  # rows=: a long case's sampled rows (forward only)
        if rows is None:
            return full_reference(q, k, v, g, beta)
        if not delta:  # simple_gla: the keys streamed, the decayed sum carried
            return gated_rows(q, k, v, g if gated else None, rows, chunk=stream)
        return delta_rows(q, k, v, g, beta, rows, gated=gated, chunk=max(1, chunk // 2), stream=stream)

    extras = gate_extras(ctx.case, gated, delta)
    scan = affine_state_scan(chunk, tuple(extras), segment=segment, states_fn=states_fn, solve=solve,
                             bf16_outputs=bf16_outputs, **kw) \
        if fast is None and offset == 0 else None
    if fast is None:
        fn.resolved = resolved
    return Prepared(fn=fn, reference=reference, extras=extras,
                    decode=recurrent_decode(gated, delta, normalize, chunk, segment, states_fn, solve),
                    softmax_comparable=False, state_scan=scan, chunk=chunk)


def affine_state_scan(chunk: int, token_extras: tuple, segment=0, **kw) -> StateScan:
    """The recurrence as a :class:`StateScan`: over a piece, the state maps affinely, ``S ↦ M S + b``
    (``M`` [B, H, dk, dk]: the product of the pieces' ``α_t (I − β_t k_t k_tᵀ)``; ``b``: the final state
    from zero). ``M`` is the chunked form run on ``S0 = I`` with zero values (the same recurrence on a
    dk x dk state), so one code path serves every variant; pieces compose as ``(M₂M₁, M₂b₁ + b₂)``.
    ``segment``: as the method's (``'auto'`` or tokens), applied to each rank's piece; ``kw`` (the variant's
    flags, ``states_fn`` and ``solve``) go to every :func:`chunked` call."""

    def summary(q, k, v, positions, g=None, beta=None):
        batch, heads, length, dk = k.shape
        seg = segment_tokens(segment, length)
        _, b = chunked(k, k, v, g, beta, chunk=chunk, return_state=True, segment=seg, **kw)
        eye = torch.eye(dk, device=k.device).expand(batch, heads, dk, dk)
        _, M = chunked(k, k, k.new_zeros(batch, heads, length, dk), g, beta, chunk=chunk, state0=eye,
                       return_state=True, segment=seg, **kw)
        return M, b

    def combine(earlier, later):
        (m1, b1), (m2, b2) = earlier, later
        return m2 @ m1, m2 @ b1 + b2

    def finish(q, k, v, positions, incoming, g=None, beta=None):
        state0 = None if incoming is None else incoming[1]
        return chunked(q, k, v, g, beta, chunk=chunk, state0=state0, segment=segment_tokens(segment, k.shape[2]),
                       **kw)

    return StateScan(summary=summary, combine=combine, finish=finish, token_extras=token_extras)


# the method_options of the own variants (:func:`build_variant`; simple_gla's ``solve`` takes ``fused`` only)
VARIANT_OPTIONS = ("chunk", "reference_naive_max_len", "reference_stream_chunk", "segment", "impl",
                   "solve", "wy_backward", "wy_precision", "outputs") + TRITON_ONLY
# a recurrence over tokens (g and beta per token): outputs before P depend on the tokens before P only, and the
# references take any length, so long cases' gradients are gated on a prefix (Capabilities.prefix_closed)
CAPS = dict(family="linear", exact=False, masks={"causal", "decode"}, causal_only=True, cross=True,
            backward=True, decode=True, prefix_closed=True)


@register_method("gated_delta_rule", Capabilities(**CAPS), options=VARIANT_OPTIONS)
def build_gated_delta_rule(ctx):
    """Gated DeltaNet, own chunked WY form (PyTorch, fp32) with O(dk·dv) recurrent decode.
    ``impl: triton``: the chunk loop through own Triton kernels (delta_triton.py)."""
    return build_variant(ctx, "gated_delta_rule")


@register_method("delta_rule", Capabilities(**CAPS), options=VARIANT_OPTIONS)
def build_delta_rule(ctx):
    """DeltaNet (no gate), own chunked WY form with recurrent decode.
    ``impl: triton``: the chunk loop through own Triton kernels (delta_triton.py)."""
    return build_variant(ctx, "delta_rule")


@register_method("simple_gla", Capabilities(**CAPS), options=VARIANT_OPTIONS)
def build_simple_gla(ctx):
    """Scalar-gated linear attention (no delta, no normalisation), own chunked form with recurrent decode.
    ``impl: triton``: the chunk loop through own Triton kernels (delta_triton.py)."""
    return build_variant(ctx, "simple_gla")


TRITON_CAPS = dict(family="linear", exact=False, masks={"causal"}, causal_only=True, backward=True,
                   requires=("triton",), max_head_dim=256, prefix_closed=True)


@register_method("simple_gla_triton", Capabilities(**TRITON_CAPS),
                 options=("chunk", "block_v", "num_warps", "seg_chunks", "reference_naive_max_len",
                          "reference_stream_chunk"))
def build_simple_gla_triton(ctx):
    """Scalar-gated linear attention (simple_gla's operator): own chunked Triton kernels (gla_triton.py),
    forward and backward (gradients of q, k, v and the gate g), causal self-attention, no decode rows (the
    recurrent step is simple_gla's). Gated against simple_gla's reference (the fp32 token loop up to
    ``reference_naive_max_len`` tokens, else the PyTorch chunked form with half the chunk). Hyper-parameters:
    ``chunk`` (power of two in 16..256, default 64), ``block_v`` (value columns per program, power of two in
    16..256, default 64), ``seg_chunks`` (chunks per parallel segment, default 4; fp32 states of
    T / (chunk · seg_chunks) · d² · 4 B per head are stored), ``num_warps`` (default 4),
    ``reference_naive_max_len`` (default 4096). Without CUDA
    or ``TRITON_INTERPRET=1`` the rows are ``unsupported``."""
    from .common import param_choice
    from .linear_attn import triton_runnable

    causal, offset = mask_mode(ctx)
    if not causal or offset != 0 or ctx.case.seq_q != ctx.case.seq_kv:
        raise Unsupported("simple_gla_triton runs causal self-attention only")
    chunk = param_int(ctx, "chunk", 64, minimum=16, maximum=256, power_of_two=True)
    block_v = param_int(ctx, "block_v", 64, minimum=16, maximum=256, power_of_two=True)
    num_warps = param_choice(ctx, "num_warps", 4, (1, 2, 4, 8, 16))
    seg_chunks = param_int(ctx, "seg_chunks", 4, minimum=1, maximum=1024)
    naive_max = param_int(ctx, "reference_naive_max_len", 4096, minimum=1)
    stream = param_int(ctx, "reference_stream_chunk", STREAM_CHUNK)
    why = triton_runnable(ctx.device)
    if why:
        raise Unsupported(f"simple_gla_triton: {why}")
    from .gla_triton import simple_gla as kernel

    kw = dict(gated=True, delta=False, normalize=False)

    def fn(q, k, v, g):
        return kernel(q, k, v, g, chunk=chunk, block_v=block_v, num_warps=num_warps, seg_chunks=seg_chunks)

    def reference(q, k, v, g, rows=None):
        if rows is not None:  # a long case's sampled rows, keys streamed (forward only)
            return gated_rows(q, k, v, g, rows, chunk=stream)
        if k.shape[2] <= naive_max:
            return naive_recurrence(q, k, v, g, **kw).to(q.dtype)
        return chunked(q, k, v, g, chunk=max(16, chunk // 2), segment=reference_segment(k.shape[2]), **kw)

    return Prepared(fn=fn, reference=reference, extras=gate_extras(ctx.case, True, False),
                    softmax_comparable=False, chunk=chunk)
