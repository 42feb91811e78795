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
:func:`gated_delta.states_impl`), ``stream`` (``auto``, the default: the whole sequence at once up to 256K tokens,
above it pieces of 128K; 0: always whole; or tokens per piece, a multiple of ``window`` and ``chunk``): the fast
form a piece at a time with the scan's state carried and, with gradients, each piece checkpointed
(:func:`streamed_layer`), so the working memory is one piece's whatever the length.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..contract import Prepared
from ..linear import gated_delta
from ..linear.common import mask_mode, param_int
from ..registry import Capabilities, Unsupported, register_method
from .layers import ParamMaker, dwconv, dwconv_reference, merge_heads, split_heads


def ssd_branch(x, p, heads: int, state: int, scan, conv, lead: int = 0):
    """x [B, lead + L, C] fp32 (normalised) -> [B, L, C]. ``lead``: tokens in front that are only the causal
    conv's left context (a piece of the streamed form, :func:`streamed_layer`; 0 for the whole sequence, whose
    conv pads zeros). ``scan(q, k, v, g)`` returns the scan's output, or (output, state) for the streamed form:
    then so does this function."""
    width = x.shape[-1]
    proj = x @ p["w_in"]
    xs, z, Bm, Cm, dt = torch.split(proj, [width, width, heads * state, heads * state, heads], dim=-1)
    xs = F.silu(conv(xs, p["conv"], True))
    if lead:
        xs, z, Bm, Cm, dt = (t[:, lead:] for t in (xs, z, Bm, Cm, dt))
    dt = F.softplus(dt + p["dt_bias"])  # [B, L, H]
    g = (dt * -torch.exp(p["a_log"])).transpose(1, 2)  # log decay [B, H, L] (<= 0)
    xh = split_heads(xs, heads)  # [B, H, L, P]
    v = xh * dt.transpose(1, 2)[..., None]
    k, q = split_heads(Bm, heads), split_heads(Cm, heads)
    scanned = scan(q, k, v, g)
    y, S = scanned if isinstance(scanned, tuple) else (scanned, None)
    y = y + p["d"][None, :, None, None] * xh
    out = (merge_heads(y) * F.silu(z)) @ p["w_out"]
    return out if S is None else (out, S)


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


STREAM_AUTO_ABOVE = 262144
"""``stream: auto`` streams the layer above this many tokens (the H200's 1M fwd and 512K fwd_bwd were ``oom``
whole: 57.6 GB at 512K fwd, ``h200-linear-lamamba-triton``), in pieces of :data:`STREAM_AUTO_PIECE`. Streamed, with
``impl: triton``: 1M fwd 1,684 ms at 22.2 GB and fwd_bwd 6,445 ms at 47.1 GB (``h200-linear-lamamba-stream``)."""
STREAM_AUTO_PIECE = 131072


def stream_piece(length: int, stream, window: int, chunk: int, field: str) -> int:
    """Tokens per piece of the streamed layer for ``stream`` (``auto``, 0 = whole, or a positive multiple of both
    ``window`` and ``chunk``: pieces hold whole windows and whole chunks); 0 when the layer runs whole.
    ValueError naming ``field`` otherwise."""
    if stream == "auto":
        if length <= STREAM_AUTO_ABOVE:
            return 0
        unit = window * chunk // math.gcd(window, chunk)
        return max(unit, STREAM_AUTO_PIECE // unit * unit)
    if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
        raise ValueError(f"{field}: must be 'auto', 0 (the whole sequence) or a positive number of tokens, "
                         f"got {stream!r}")
    if stream and (stream % window or stream % chunk):
        raise ValueError(f"{field}: {stream} tokens must be a multiple of both window ({window}) and chunk "
                         f"({chunk}): a piece holds whole windows and whole chunks")
    return 0 if stream >= length else stream


def layer_span(x, start: int, stop: int, p, heads: int, state: int, window: int, scan, conv, dense: bool):
    """Tokens ``start .. stop`` of the layer (``x``'s dtype; the whole layer is ``0 .. L``): the SSD branch (the
    conv reads up to 3 tokens of ``x`` in front of ``start``) and the window attention, each with its residual and
    LayerNorm; with the scan's state after them where ``scan`` returns one (the streamed form), else None."""
    lead = min(start, p["conv"].shape[-1] - 1)
    xf = x[:, start - lead:stop].float()
    width = xf.shape[-1]
    branch = ssd_branch(F.layer_norm(xf, (width,)), p, heads, state, scan, conv, lead=lead)
    ssd, S_out = branch if isinstance(branch, tuple) else (branch, None)
    h = xf[:, lead:] + ssd
    y = h + window_attention(F.layer_norm(h, (width,)), p, heads, window, dense)
    return y.to(x.dtype), S_out


def _layer_piece(x, start: int, stop: int, S, p, heads: int, state: int, window: int, scan_state, conv,
                 carry: bool = True):
    """Tokens ``start .. stop`` of the fast layer and the scan's state after them, from the state ``S`` before
    them (None: zero; ``carry=False`` drops it: the tests' negative control)."""
    def scan(q, k, v, g):
        return scan_state(q, k, v, g, S if carry else None)

    return layer_span(x, start, stop, p, heads, state, window, scan, conv, False)


def streamed_layer(x, p, heads: int, state: int, window: int, piece: int, scan_state, conv, carry: bool = True):
    """The layer (fast form) ``piece`` tokens at a time: the SSD scan's state [B, H, N, P] carried from piece to
    piece, each piece's causal conv given its 3 tokens of left context, the window attention per piece (pieces
    hold whole windows, :func:`stream_piece`). Same outputs and gradients as the whole layer up to float
    rounding; the working memory is one piece's. With gradients, each piece runs under
    ``torch.utils.checkpoint`` (non-reentrant): between forward and backward only ``x`` (the caller's) and the
    carried states are kept, and the backward recomputes one piece's forward at a time (the cost: one more
    forward). ``carry=False`` (each piece from a zero state) is a deliberately broken variant for the tests'
    negative control."""
    length = x.shape[1]
    train = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in p.values()))
    out = None if train else torch.empty_like(x)
    pieces, S = [], None
    for start in range(0, length, piece):
        stop = min(start + piece, length)
        args = (x, start, stop, S, p, heads, state, window, scan_state, conv, carry)
        if train:
            y, S = checkpoint(_layer_piece, *args, use_reentrant=False, preserve_rng_state=False)
            pieces.append(y)
        else:
            y, S = _layer_piece(*args)
            out[:, start:stop] = y
            del y
    return torch.cat(pieces, dim=1) if train else out


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
                          "impl", "stream") + gated_delta.TRITON_ONLY)
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

    # stream: auto (default: whole up to STREAM_AUTO_ABOVE tokens, pieces of STREAM_AUTO_PIECE above) | 0 (whole)
    # | tokens per piece: the fast form's layer a piece at a time (streamed_layer), state carried
    piece = stream_piece(case.seq_q, ctx.param("stream", "auto"), window, chunk, f"method_options.{case.method}.stream")

    def scan_state(q, k, v, g, S0):
        return gated_delta.chunked(q, k, v, g, None, chunk=chunk, states_fn=states_fn, state0=S0,
                                   return_state=True, **kw)

    def layer(scan, conv, dense):
        return lambda x: layer_span(x, 0, x.shape[1], p, heads, state, window, scan, conv, dense)[0]

    whole_layer = layer(fast_scan, dwconv, False)

    def fast_layer(x):
        if piece:
            return streamed_layer(x, p, heads, state, window, piece, scan_state, dwconv)
        return whole_layer(x)

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
    return Prepared(fn=fast_layer, reference=reference,
                    parameters=make.tensors, flops=flops, softmax_comparable=False)
