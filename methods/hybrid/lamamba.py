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
softmax per window. fp32 inside. Hyper-parameters: ``window`` (default 256), ``state_size`` (default 64),
``chunk`` (default 64).
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


def window_attention(x, p, heads: int, window: int, dense: bool):
    batch, length, width = x.shape
    qkv = x @ p["w_qkv"]
    pad = -length % window
    if pad:
        qkv = F.pad(qkv, (0, 0, 0, pad))
    n = (length + pad) // window
    q, k, v = (split_heads(t, heads) for t in qkv.split(width, dim=-1))  # [B, H, L', P]
    q, k, v = (t.reshape(batch, heads, n, window, -1) for t in (q, k, v))
    if dense:
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(window, window, dtype=torch.bool, device=x.device).tril()
        o = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v
    else:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    o = o.reshape(batch, heads, n * window, -1)[:, :, :length]
    return merge_heads(o) @ p["w_o"]


@register_method("lamamba", Capabilities(family="hybrid", exact=False, form="layer", masks={"causal"},
                                          causal_only=True, backward=True, trainable=True))
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

    def fast_scan(q, k, v, g):
        return gated_delta.chunked(q, k, v, g, None, chunk=chunk, **kw)

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

    length = case.seq_q
    P = case.head_dim
    flops = case.batch * length * (2.0 * width * (2 * width + 2 * heads * state + heads) + 4.0 * width * width
                                   + 2.0 * width * 3 * width + 2.0 * heads * (2 * chunk * (state + P) + 4 * state * P)
                                   + 2.0 * heads * window * P)
    return Prepared(fn=layer(fast_scan, dwconv, False), reference=layer(ref_scan, dwconv_reference, True),
                    parameters=make.tensors, flops=flops, softmax_comparable=False)
