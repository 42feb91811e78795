"""LaMamba (Fu, Chen, Yu, arXiv:2408.02615), §14, as a 1-D causal layer: a state-space branch and local
window attention, each behind a residual and a LayerNorm:

    h = x + SSD(LN(x)),   y = h + WinAttn(LN(h))

The state-space branch is a Mamba-2-style selective SSM (scalar decay per head: ``h_t = e^{Δ_t A} h_{t−1} +
Δ_t B_t x_tᵀ``, ``y_t = C_tᵀ h_t + D x_t``, gated by SiLU(z)), after a causal depthwise conv (k = 4) and SiLU —
chosen over Mamba-1's per-channel decay because its chunked form is the scalar-gated linear attention the
family already has (``gated_delta.chunked`` without the delta term, scale 1). The window attention is causal
attention inside non-overlapping windows of ``window`` tokens (the spec's 1-D version; no shift, no relative
bias, no adaLN). A different operator (class N).

Forms: fast = chunked SSD (the WY code without delta) + SDPA over windows; reference = the SSD token loop (up
to ``reference_loop_max_len``, else the chunked form in fp32 with twice the chunk) + a materialised masked
softmax per window; its ``rows=`` form (:func:`lamamba_rows`, long cases' sampled tokens) streams the scan
in pieces of ``reference_stream_chunk`` with the state carried and attends each row's window only. fp32 inside
(so the window attention reaches SDPA in fp32: its memory-efficient kernel, not flash or cuDNN). Hyper-parameters:
``window`` (default 256), ``state_size`` (default 64), ``chunk`` (default 64), ``impl`` (``torch``, the default, or
``triton``: the scan's chunk loop through the gated variants' own Triton kernels, with their options,
:func:`gated_delta.states_impl`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..linear import gated_delta
from ..linear.common import mask_mode, param_int
from ..registry import Capabilities, Unsupported, register_method
from .layers import ParamMaker, dwconv, dwconv_reference, merge_heads, split_heads


def ssd_branch(x, p, heads: int, state: int, scan, conv):
    """x [B, L, C] fp32 (normalised) -> [B, L, C]."""
    width = x.shape[-1]
    proj = x @ p["w_in"]
    xs, z, Bm, Cm, dt = torch.split(proj, [width, width, heads * state, heads * state, heads], dim=-1)
    xs = F.silu(conv(xs, p["conv"], True))
    dt = F.softplus(dt + p["dt_bias"])  # [B, L, H]
    g = (dt * -torch.exp(p["a_log"])).transpose(1, 2)  # log decay [B, H, L] (<= 0)
    xh = split_heads(xs, heads)  # [B, H, L, P]
    v = xh * dt.transpose(1, 2)[..., None]
    k, q = split_heads(Bm, heads), split_heads(Cm, heads)
    y = scan(q, k, v, g) + p["d"][None, :, None, None] * xh
    return (merge_heads(y) * F.silu(z)) @ p["w_out"]


def window_windows(t, heads: int, window: int):
    """[B, L', H·P] (L' a multiple of ``window``) -> [B · L'/window, H, window, P]: the windows folded into the
    batch (a view). 4-D, as SDPA's fused kernels take (with 5-D inputs, [B, H, n, window, P], SDPA runs its math
    form, which holds [n, window, window] scores per head: 16 GiB fp32, three of them, at 1M tokens and 16 heads)."""
    batch, length, width = t.shape
    return t.reshape(batch * (length // window), window, heads, width // heads).transpose(1, 2)


def window_attention(x, p, heads: int, window: int, dense: bool):
    batch, length, width = x.shape
    qkv = x @ p["w_qkv"]
    pad = -length % window
    if pad:
        qkv = F.pad(qkv, (0, 0, 0, pad))
    q, k, v = (window_windows(t, heads, window) for t in qkv.split(width, dim=-1))  # [B·n, H, window, P]
    if dense:
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(window, window, dtype=torch.bool, device=x.device).tril()
        o = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v
    else:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    o = o.transpose(1, 2).reshape(batch, length + pad, width)[:, :length]
    return o @ p["w_o"]


def lamamba_rows(x, rows, p, heads: int, state: int, window: int, chunk: int, stream: int, carry: bool = True):
    """The reference layer at tokens ``rows`` only (``[B, len(rows), C]``, fp32), for long cases. A row ``t``
    reads ``h`` at its window's tokens ``w0 .. t`` (``w0 = t − t mod window``), so ``h`` is kept at those
    tokens only: the tokens are walked in pieces of ``stream`` (the causal conv given its 3 tokens of left
    context), each piece's SSD scan (``gated_delta.chunked`` without the delta term) started from the state
    carried out of the piece before; then each row's causal softmax over its window. Work O(L) (the scan runs
    through every token up to the last row), extra memory O(stream · C + len(rows) · window · C), whatever the
    length. ``carry=False`` (each piece starts from a zero state) is a deliberately broken variant for the
    tests' negative control."""
    if stream < 1:
        raise ValueError(f"lamamba_rows: stream must be >= 1, got {stream}")
    rows = rows.to(x.device).long()
    width = x.shape[-1]
    starts = rows - rows % window
    need = torch.cat([torch.arange(int(a), int(b) + 1, device=x.device) for a, b in zip(starts, rows)]).unique()
    kept = x.new_zeros(x.shape[0], need.numel(), width, dtype=torch.float32)  # h at the needed tokens
    end = int(rows.max()) + 1 if rows.numel() else 0
    lead = p["conv"].shape[-1] - 1
    S = None
    for start in range(0, end, stream):
        stop = min(start + stream, end)
        here = ((need >= start) & (need < stop)).nonzero().squeeze(1)
        begin = max(0, start - lead)  # the causal conv's left context
        xf = x[:, begin:stop].float()
        proj = F.layer_norm(xf, (width,)) @ p["w_in"]
        xs, z, Bm, Cm, dt = torch.split(proj, [width, width, heads * state, heads * state, heads], dim=-1)
        xs = F.silu(dwconv_reference(xs, p["conv"], True))[:, start - begin:]
        z, Bm, Cm, dt = (t[:, start - begin:] for t in (z, Bm, Cm, dt))
        dt = F.softplus(dt + p["dt_bias"])
        g = (dt * -torch.exp(p["a_log"])).transpose(1, 2)
        xh = split_heads(xs, heads)
        v = xh * dt.transpose(1, 2)[..., None]
        k, q = split_heads(Bm, heads), split_heads(Cm, heads)
        y, S_out = gated_delta.chunked(q, k, v, g, None, gated=True, delta=False, normalize=False, scale=1.0,
                                       chunk=chunk, state0=S, return_state=True)
        S = S_out if carry else None
        if here.numel():
            y = y + p["d"][None, :, None, None] * xh
            h = xf[:, start - begin:] + (merge_heads(y) * F.silu(z)) @ p["w_out"]
            kept[:, here] = h[:, need[here] - start]
    out = x.new_zeros(x.shape[0], rows.numel(), width, dtype=torch.float32)
    for i, (w0, t) in enumerate(zip(starts.tolist(), rows.tolist())):
        idx = torch.searchsorted(need, torch.arange(w0, t + 1, device=x.device))
        hw = kept[:, idx]  # [B, n, C]: the row's window, the row last
        qkv = F.layer_norm(hw, (width,)) @ p["w_qkv"]
        qw, kw, vw = (split_heads(t_, heads) for t_ in qkv.split(width, dim=-1))  # [B, H, n, P]
        attn = torch.softmax(qw[:, :, -1:] @ kw.transpose(-1, -2) / math.sqrt(qw.shape[-1]), -1)
        out[:, i] = hw[:, -1] + merge_heads(attn @ vw)[:, 0] @ p["w_o"]
    return out


@register_method("lamamba", Capabilities(family="hybrid", exact=False, form="layer", masks={"causal"},
                                          causal_only=True, backward=True, trainable=True),
                 options=("window", "state_size", "chunk", "reference_loop_max_len", "reference_stream_chunk",
                          "impl") + gated_delta.TRITON_ONLY)
def build_lamamba(ctx):
    """LaMamba layer: Mamba-2-style SSD branch + causal window attention, each with residual and LayerNorm."""
    mask_mode(ctx)
    case = ctx.case
    if case.seq_q != case.seq_kv:
        raise Unsupported("lamamba is a self-attention layer (seq_q == seq_kv)")
    window = param_int(ctx, "window", 256, minimum=1)
    state = param_int(ctx, "state_size", 64, minimum=1, maximum=1024)
    chunk = param_int(ctx, "chunk", 64, minimum=1, maximum=1024)
    loop_max = param_int(ctx, "reference_loop_max_len", 2048)
    heads, width = case.heads_q, case.heads_q * case.head_dim
    make = ParamMaker(case.seed, ctx.device)
    std = width ** -0.5
    p = {
        "w_in": make.randn(width, 2 * width + 2 * heads * state + heads, std=std),
        "conv": make.randn(width, 4, std=0.5),
        "dt_bias": make.uniform(heads, low=math.log(math.expm1(1e-3)), high=math.log(math.expm1(1e-1))),
        "a_log": make.uniform(heads, low=0.0, high=math.log(16.0)),
        "d": make.const(heads, value=1.0),
        "w_out": make.randn(width, width, std=std),
        "w_qkv": make.randn(width, 3 * width, std=std),
        "w_o": make.randn(width, width, std=std),
    }
    kw = dict(gated=True, delta=False, normalize=False, scale=1.0)
    # impl: torch (default) | triton: the SSD scan's loop over chunks through the own Triton kernels of the
    # gated variants (delta_triton.py, with their block_v / num_warps / dot_precision / num_stages), the rest
    # of the layer unchanged; the reference stays PyTorch
    states_fn = gated_delta.states_impl(ctx, chunk)

    def fast_scan(q, k, v, g):
        return gated_delta.chunked(q, k, v, g, None, chunk=chunk, states_fn=states_fn, **kw)

    def ref_scan(q, k, v, g):
        if q.shape[2] <= loop_max:
            return gated_delta.naive_recurrence(q, k, v, g, None, **kw)
        return gated_delta.chunked(q, k, v, g, None, chunk=2 * chunk, **kw)

    def layer(scan, conv, dense):
        def forward(x):
            xf = x.float()
            width_ = xf.shape[-1]
            h = xf + ssd_branch(F.layer_norm(xf, (width_,)), p, heads, state, scan, conv)
            y = h + window_attention(F.layer_norm(h, (width_,)), p, heads, window, dense)
            return y.to(x.dtype)

        return forward

    stream = param_int(ctx, "reference_stream_chunk", 4096)
    dense_ref = layer(ref_scan, dwconv_reference, True)

    def reference(x, rows=None):
        if rows is not None:  # a long case's sampled tokens: the scan streamed, each row's window only
            plain = {key: val.float() for key, val in p.items()}
            return lamamba_rows(x, rows, plain, heads, state, window, 2 * chunk, stream)
        return dense_ref(x)

    length = case.seq_q
    P = case.head_dim
    flops = case.batch * length * (2.0 * width * (2 * width + 2 * heads * state + heads) + 4.0 * width * width
                                   + 2.0 * width * 3 * width + 2.0 * heads * (2 * chunk * (state + P) + 4 * state * P)
                                   + 2.0 * heads * window * P)
    return Prepared(fn=layer(fast_scan, dwconv, False), reference=reference,
                    parameters=make.tensors, flops=flops, softmax_comparable=False)
