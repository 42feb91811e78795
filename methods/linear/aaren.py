"""Aaren: attention as a many-to-many RNN through a prefix scan (Feng et al., arXiv:2405.13956), §9.

Layer form (``form="layer"``, x ``[B, L, H·D]``): per head a *learned* query vector q0 (input-independent),
keys and values ``K = x W_k``, ``V = x W_v``, scores ``s_i = q0·k_i / √D``, and for every position k the
softmax attention of q0 over the prefix: ``o_k = Σ_{i≤k} e^{s_i} v_i / Σ_{i≤k} e^{s_i}``; output
``y = O W_o``. A per-position query is impossible here (the scan needs a fixed query), hence the layer form.

Forms: :func:`scan_loop` (the recurrence with state (m, c, a): readable, O(L) Python steps, the reference up to
``reference_loop_max_len``), :func:`scan_chunked` (per chunk of C tokens a cumsum relative to the chunk's
maximum; across chunks an exclusive prefix of the chunk summaries rescaled to the running maximum with an
N×N lower-triangular matrix of ``exp(m_c' − max_{c''<c} m_c'') <= 1`` — every exponent is ≤ 0; within a chunk
the reference is the chunk max, stable while a chunk's score range is < ~80 in fp32), and
:func:`aaren_step` (O(D) state per head: the recurrent decode of a layer, tested on the CPU; the harness's
decode mode serves q/k/v methods only); the reference's ``rows=`` form, :func:`aaren_rows` (long cases' sampled
tokens, streamed in chunks of ``reference_stream_chunk``). fp32 inside. Exact softmax of its fixed query (class E of its own
definition); no softmax-comparable q/k/v, so no approx_err. Hyper-parameters: ``chunk`` (default √L rounded
to a power of two, at least 64), ``reference_loop_max_len`` (default 2048).
"""
from __future__ import annotations

import math

import torch

from ..contract import Prepared
from ..registry import Capabilities, Unsupported, register_method
from . import rows as rows_mod
from .common import mask_mode, param_int


def _heads(t, heads):
    batch, length, width = t.shape
    return t.view(batch, length, heads, width // heads).transpose(1, 2)


def scan_loop(s, v):
    """The recurrence: s [B, H, L], v [B, H, L, D] -> o [B, H, L, D] (fp32)."""
    s, v = s.float(), v.float()
    m = torch.full(s.shape[:2], float("-inf"), device=s.device)
    c = torch.zeros(s.shape[:2], device=s.device)
    a = torch.zeros(*s.shape[:2], v.shape[-1], device=s.device)
    outs = []
    for t in range(s.shape[2]):
        m_new = torch.maximum(m, s[:, :, t])
        decay, weight = torch.exp(m - m_new), torch.exp(s[:, :, t] - m_new)
        c = c * decay + weight
        a = a * decay[..., None] + weight[..., None] * v[:, :, t]
        m = m_new
        outs.append(a / c[..., None])
    return torch.stack(outs, dim=2)


def scan_chunked(s, v, chunk: int):
    """The chunked scan (see the module docstring): s [B, H, L], v [B, H, L, D] -> o (fp32)."""
    s, v = s.float(), v.float()
    batch, heads, length = s.shape
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:  # padded scores are far below any real one: weight 0, never a chunk's maximum
        s = torch.cat([s, s.new_full((batch, heads, pad), -1e30)], dim=2)
        v = torch.cat([v, v.new_zeros(batch, heads, pad, v.shape[-1])], dim=2)
    sc = s.view(batch, heads, n, chunk)
    vc = v.view(batch, heads, n, chunk, v.shape[-1])
    m = sc.amax(-1).detach()  # chunk maxima [B, H, N]
    e = torch.exp(sc - m[..., None])
    cu = e.cumsum(-1)  # [B, H, N, C]
    cw = (e[..., None] * vc).cumsum(-2)  # [B, H, N, C, D]
    # running maximum over the chunks strictly before c (R_0 is unused: its prefix is empty)
    before = torch.cummax(m, dim=-1).values
    R = torch.cat([before[..., :1], before[..., :-1]], dim=-1)
    strict = torch.ones(n, n, dtype=torch.bool, device=s.device).tril(-1)
    expo = (m[..., None, :] - R[..., :, None]).masked_fill(~strict, float("-inf"))
    E = torch.exp(expo)  # [B, H, N(c), N(c')] = exp(m_c' - R_c) for c' < c
    pu = E @ cu[..., -1:].squeeze(-1)[..., None]  # [B, H, N, 1]
    pw = E @ cw[..., -1, :]  # [B, H, N, D]
    T = torch.maximum(R, m)
    T = torch.where(torch.arange(n, device=s.device) == 0, m, T)
    a_prev = torch.exp(R - T)[..., None]
    a_prev = torch.where(torch.arange(n, device=s.device)[:, None] == 0, torch.zeros_like(a_prev), a_prev)
    a_now = torch.exp(m - T)[..., None]
    num = (pw * a_prev)[..., None, :] + cw * a_now[..., None]
    den = (pu * a_prev)[..., None, :] + cu[..., None] * a_now[..., None]
    out = (num / den).reshape(batch, heads, n * chunk, v.shape[-1])
    return out[:, :, :length]


def aaren_step(state, s_t, v_t):
    """One token: state (m, c, a) -> (new state, o_t); s_t [B, H], v_t [B, H, D]."""
    m, c, a = state
    m_new = torch.maximum(m, s_t)
    decay, weight = torch.exp(m - m_new), torch.exp(s_t - m_new)
    c, a = c * decay + weight, a * decay[..., None] + weight[..., None] * v_t
    return (m_new, c, a), a / c[..., None]


def init_parameters(width: int, heads: int, generator, device):
    std = width ** -0.5
    dim = width // heads

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=generator, device=device) * std).requires_grad_(True)

    return {"q0": torch.randn(heads, dim, generator=generator, device=device).requires_grad_(True),
            "w_k": mat(width, width), "w_v": mat(width, width), "w_o": mat(width, width)}


def aaren_layer(params, heads, scan):
    def forward(x):
        dtype = x.dtype
        xf = x.float()
        k = _heads(xf @ params["w_k"].float(), heads)
        v = _heads(xf @ params["w_v"].float(), heads)
        s = (k * params["q0"].float()[None, :, None, :]).sum(-1) / math.sqrt(k.shape[-1])
        o = scan(s, v)
        y = o.transpose(1, 2).reshape(x.shape) @ params["w_o"].float()
        return y.to(dtype)

    return forward


def aaren_rows(params, heads, x, rows, *, chunk: int = rows_mod.ROWS_CHUNK, carry: bool = True):
    """The layer's output at tokens ``rows`` only (``[B, len(rows), width]``, ``x``'s dtype), for long cases: the
    fixed query's softmax over each row's prefix, tokens streamed ``chunk`` at a time (keys, values and scores
    made per chunk; :func:`rows.softmax_rows` carries (m, c, a) per row), then ``W_o``. Extra memory
    O(len(rows) · chunk + chunk · width) per batch, whatever the length. ``carry``: see :func:`rows.softmax_rows`."""
    rows = rows.to(x.device).long()
    q0 = params["q0"].float()[None, :, None, :]
    w_k, w_v = params["w_k"].float(), params["w_v"].float()

    def chunk_fn(start, stop):
        xs = x[:, start:stop].float()
        k, v = _heads(xs @ w_k, heads), _heads(xs @ w_v, heads)
        s = (k * q0).sum(-1) / math.sqrt(k.shape[-1])  # [B, H, n]: one score per token (the query is fixed)
        return s[:, :, None, :], v

    o = rows_mod.softmax_rows(chunk_fn, x.shape[1], rows, chunk=chunk, carry=carry)  # [B, H, r, D]
    y = o.transpose(1, 2).reshape(x.shape[0], rows.numel(), x.shape[-1]) @ params["w_o"].float()
    return y.to(x.dtype)


@register_method("aaren", Capabilities(family="linear", exact=False, form="layer", masks={"causal"},
                                        causal_only=True, backward=True, trainable=True),
                 options=("chunk", "reference_loop_max_len", "reference_stream_chunk"))
def build_aaren(ctx):
    """Aaren layer: learned query, prefix-scan softmax over each prefix (chunked scan; O(D) decode state)."""
    causal, offset = mask_mode(ctx)
    case = ctx.case
    if case.seq_q != case.seq_kv:
        raise Unsupported("aaren is a self-attention layer (seq_q == seq_kv)")
    length = case.seq_q
    default_chunk = max(64, 1 << math.ceil(math.log2(math.sqrt(length))))
    chunk = param_int(ctx, "chunk", default_chunk, minimum=1)
    loop_max = param_int(ctx, "reference_loop_max_len", 2048)
    width = case.heads_q * case.head_dim
    gen = torch.Generator(device=ctx.device).manual_seed(case.seed)
    params = init_parameters(width, case.heads_q, gen, ctx.device)
    fast = aaren_layer(params, case.heads_q, lambda s, v: scan_chunked(s, v, chunk))
    ref = aaren_layer(params, case.heads_q,
                      lambda s, v: scan_loop(s, v) if s.shape[2] <= loop_max else scan_chunked(s, v, 2 * chunk))
    stream = param_int(ctx, "reference_stream_chunk", rows_mod.ROWS_CHUNK)

    def reference(x, rows=None):
        if rows is not None:  # a long case's sampled tokens, streamed (forward only)
            return aaren_rows(params, case.heads_q, x, rows, chunk=stream)
        return ref(x)

    flops = 2.0 * case.batch * length * width * width * 3 + 6.0 * case.batch * length * width
    return Prepared(fn=fast, reference=reference, parameters=list(params.values()), flops=flops,
                    softmax_comparable=False)
