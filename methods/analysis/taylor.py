"""Softmax attention as an RNN (Mongaras & Larson, arXiv:2507.23632; methods-spec-3 §9): the truncated
Taylor softmax and two "norm in place of the denominator" variants. Written from the paper's equations.

``taylor_softmax`` (class A, tends to softmax as the order grows): with ``s = q·k/√d``, the weight of a visible
pair is the order-``n`` Taylor polynomial of ``exp``, ``w = Σ_{k≤n} s^k/k!``, and ``out_i = Σ_j w_ij v_j /
Σ_j w_ij``. Two forms:

* parallel, O(L²d): the polynomial of the score matrix, evaluated in query chunks (checkpointed under
  autograd, O(chunk·L) memory);
* recurrent, O(L·D_φ·d): ``exp(q·k) ≈ Σ_k ⟨q^{⊗k}, k^{⊗k}⟩/k!``, i.e. linear attention with the feature map
  ``φ(x) = [1, x', x'^{⊗2}/√2!, …, x'^{⊗n}/√n!]`` (``x' = x/d^{1/4}``), run by the chunked linear-attention
  skeleton with fp32 states; its decode state is ``D_φ × d_v`` per head (``D_φ = Σ_k d^k``). Feasible for
  n ≤ 2-3 and small d (``max_features``).

``form``: ``auto`` (recurrent when ``D_φ <= max_features``, else parallel), ``parallel`` or ``recurrent``.
The reference is always the parallel polynomial, evaluated term by term (``s^k/k!`` summed), in query chunks
of another size. Odd orders can make a weight, and so a denominator, negative or zero (the code's
``softmax_taylor_80terms`` is even-safe only by its length); even orders are positive for every logit.
Hyper-parameters: ``order`` (default 2), ``form``, ``max_features`` (4,161 = 1 + 64 + 64², order 2 at d=64),
``chunk`` (rows of the parallel form / chunk length of the recurrent form), ``eps`` (denominator, 1e-6).

``softmax_l2out`` (class N): ``out_i = L2normalize(Σ_j exp(s_ij) v_j)`` — the code's
``gated_softmax_no_gate_L2norm_nodivS_noclamp``: the norm replaces the denominator. Since the norm ignores a
positive factor, the fast path is ``normalize(SDPA(q, k, v))`` (flash/cuDNN-class kernels); the reference
sums ``exp(s - rowmax)`` explicitly. ``clamp`` (default none) clamps the logits first (then the fast path is
the explicit chunked form). ``eps`` of the normalisation: 1e-6.

``softmax_divs_gate`` (class N): the code's ``softmax_divS_gate``: no denominator; divide by the number of
visible keys ``t_i`` and gate per head: ``out_i = σ(g_i) · Σ_j exp(min(s_ij, c)) v_j / t_i`` with logits
clamped at ``c`` (``clamp``, default 5, as the code). The gate comes from the hidden state in the paper; in
kernel form it is ``g_i = ⟨q_i, w_g⟩ + b_g`` per head (learned ``w_g [H, d]``, ``b_g [H]``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..linear.common import chunked_linear, linear_decode
from ..registry import Capabilities, Unsupported, register_method
from .common import (ParamMaker, by_query_chunks, default_chunk, expand_heads, mask_mode, param_choice, param_float,
                     param_int, row_visibility, scale_of)

ANALYSIS_KERNEL = dict(family="analysis", exact=False, masks={"full", "causal"}, cross=True, gqa=True,
                       backward=True)


# ---- taylor_softmax ----------------------------------------------------------------------------------------------
def taylor_weights(s: torch.Tensor, order: int) -> torch.Tensor:
    """Σ_{k≤order} s^k / k!, term by term (the readable form)."""
    total = torch.ones_like(s)
    power = torch.ones_like(s)
    for k in range(1, order + 1):
        power = power * s
        total = total + power / math.factorial(k)
    return total


def _horner(s: torch.Tensor, order: int) -> torch.Tensor:
    """The same polynomial by Horner's rule (the fast parallel form)."""
    out = torch.full_like(s, 1.0 / math.factorial(order))
    for k in range(order - 1, -1, -1):
        out = out * s + 1.0 / math.factorial(k)
    return out


def polynomial_attention(q, k, v, *, weight, causal: bool, offset: int, chunk: int, eps: float, normalize=True,
                         rows=None, compute=torch.float32, pre_mask: bool = False):
    """``out_i = Σ_j w(s_ij) v_j / Σ_j w(s_ij)`` over visible keys, ``s = q·k/√d``, in query chunks (``compute``
    dtype inside). ``normalize=False`` returns the numerator alone. Rows with no visible key give 0.
    ``pre_mask``: hidden logits are -inf when ``weight`` sees them (for weights that subtract a row max)."""
    heads = q.shape[1]
    k, v = expand_heads(k, heads), expand_heads(v, heads)
    scale = scale_of(q.shape[-1])
    seq_kv = k.shape[2]

    def rows_fn(qc, r0, r1, k, v):
        s = (qc.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
        seen = row_visibility(r0, r1, seq_kv, causal, offset, q.device)
        if pre_mask and seen is not None:
            s = s.masked_fill(~seen, float("-inf"))
        w = weight(s)
        if seen is not None:
            w = w.masked_fill(~seen, 0.0)
        num = w @ v.to(compute)
        if not normalize:
            return num
        den = w.sum(-1, keepdim=True)
        out = num / (den + eps)
        if seen is not None:
            out = out.masked_fill(~seen.any(-1)[:, None], 0.0)
        return out

    return by_query_chunks(rows_fn, q, chunk=chunk, rows=rows, k=k, v=v).to(v.dtype)


def taylor_features(x: torch.Tensor, order: int) -> torch.Tensor:
    """``[1, x', x'^{⊗2}/√2!, …]`` with ``x' = x / d^{1/4}`` (so that ⟨φ(q), φ(k)⟩ = Σ (q·k/√d)^k / k!), fp32."""
    x = x.float() / x.shape[-1] ** 0.25
    parts = [torch.ones(*x.shape[:-1], 1, device=x.device)]
    power = torch.ones(*x.shape[:-1], 1, device=x.device)
    for k in range(1, order + 1):
        power = (power[..., :, None] * x[..., None, :]).flatten(-2)
        parts.append(power / math.sqrt(math.factorial(k)))
    return torch.cat(parts, dim=-1)


def feature_dim(head_dim: int, order: int) -> int:
    return sum(head_dim ** k for k in range(order + 1))


@register_method("taylor_softmax", Capabilities(**ANALYSIS_KERNEL, decode=True),
                 options=("order", "form", "max_features", "eps", "chunk"))
def build_taylor_softmax(ctx):
    """Truncated Taylor softmax of order n (parallel polynomial form or recurrent feature-map form)."""
    causal, offset = mask_mode(ctx)
    case = ctx.case
    order = param_int(ctx, "order", 2, minimum=0, maximum=40)
    form = param_choice(ctx, "form", "auto", ("auto", "parallel", "recurrent"))
    max_features = param_int(ctx, "max_features", 4161)
    eps = param_float(ctx, "eps", 1e-6, minimum=0.0)
    dims = feature_dim(case.head_dim, order)
    if form == "auto":
        form = "recurrent" if dims <= max_features else "parallel"
    if form == "recurrent" and dims > max_features:
        raise Unsupported(f"method_options.taylor_softmax.form: recurrent needs {dims} features at order {order}, "
                          f"head_dim {case.head_dim}; above method_options.taylor_softmax.max_features={max_features}")
    heads = case.heads_q
    if form == "recurrent":
        chunk = param_int(ctx, "chunk", 64, maximum=4096)
    else:
        chunk = param_int(ctx, "chunk", default_chunk(case.seq_q, case.seq_kv, heads, case.batch), maximum=1 << 20)
    ref_chunk = max(1, default_chunk(case.seq_q, case.seq_kv, heads, case.batch) // 2)

    def features(q, k, v, q_pos=None, k_pos=None):
        return taylor_features(q, order), taylor_features(expand_heads(k, heads), order), expand_heads(v, heads)

    def fn(q, k, v):
        if form == "recurrent":
            fq, fk, vv = features(q, k, v)
            return chunked_linear(fq, fk, vv, causal=causal, offset=offset, eps=eps, chunk=chunk)
        return polynomial_attention(q, k, v, weight=lambda s: _horner(s, order), causal=causal, offset=offset,
                                    chunk=chunk, eps=eps)

    def reference(q, k, v, rows=None):
        return polynomial_attention(q, k, v, weight=lambda s: taylor_weights(s, order), causal=causal,
                                    offset=offset, chunk=ref_chunk, eps=eps, rows=rows, compute=q.dtype)

    decode = linear_decode(features, eps) if causal and form == "recurrent" else None
    return Prepared(fn=fn, reference=reference, decode=decode)


# ---- softmax_l2out -----------------------------------------------------------------------------------------------
def _exp_weights(clamp):
    def weight(s):
        if clamp is not None:
            s = s.clamp_max(clamp)
        return torch.exp(s - s.amax(-1, keepdim=True).detach().clamp_min(-1e30))

    return weight


@register_method("softmax_l2out", Capabilities(**ANALYSIS_KERNEL), options=("clamp", "eps", "chunk"))
def build_softmax_l2out(ctx):
    """L2 norm of the exp-weighted value sum in place of the softmax denominator (norm-for-denominator)."""
    from ..exact.sdpa import sdpa_mask_args

    causal, offset = mask_mode(ctx)
    case = ctx.case
    clamp = ctx.param("clamp", None)
    if clamp is not None:
        clamp = param_float(ctx, "clamp", 5.0)
    eps = param_float(ctx, "eps", 1e-6, minimum=0.0, strict_min=True)
    chunk = param_int(ctx, "chunk", default_chunk(case.seq_q, case.seq_kv, case.heads_q, case.batch), maximum=1 << 20)
    ref_chunk = max(1, chunk // 2)
    sdpa_kwargs = sdpa_mask_args(ctx, allow_dense=False)
    if case.heads_kv != case.heads_q:
        sdpa_kwargs["enable_gqa"] = True
    seen = None
    if causal and offset < 0:  # queries before the first key: no key, output 0
        seen = (torch.arange(case.seq_q, device=ctx.device) + offset >= 0)[:, None]

    def explicit(q, k, v, rows=None, chunk_rows=chunk, compute=torch.float32):
        # exp weights with the (visible) row max subtracted (the norm ignores that factor), then the L2 norm
        num = polynomial_attention(q, k, v, weight=_exp_weights(clamp), causal=causal, offset=offset,
                                   chunk=chunk_rows, eps=0.0, normalize=False, rows=rows, compute=compute,
                                   pre_mask=True)
        return F.normalize(num.float(), dim=-1, eps=eps).to(v.dtype)

    def fn(q, k, v):
        if clamp is not None:
            return explicit(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
        if seen is not None:
            out = out.masked_fill(~seen, 0.0)
        return F.normalize(out.float(), dim=-1, eps=eps).to(v.dtype)

    def reference(q, k, v, rows=None):
        return explicit(q, k, v, rows=rows, chunk_rows=ref_chunk, compute=q.dtype)

    return Prepared(fn=fn, reference=reference, softmax_comparable=False)


# ---- softmax_divs_gate -------------------------------------------------------------------------------------------
@register_method("softmax_divs_gate", Capabilities(**ANALYSIS_KERNEL, trainable=True), options=("clamp", "chunk"))
def build_softmax_divs_gate(ctx):
    """exp numerator (logits clamped), divided by the visible-key count, times a per-head sigmoid gate."""
    causal, offset = mask_mode(ctx)
    case = ctx.case
    clamp = param_float(ctx, "clamp", 5.0)
    chunk = param_int(ctx, "chunk", default_chunk(case.seq_q, case.seq_kv, case.heads_q, case.batch), maximum=1 << 20)
    ref_chunk = max(1, chunk // 2)
    make = ParamMaker(case.seed, ctx.device)
    w_gate = make.randn(case.heads_q, case.head_dim, std=case.head_dim ** -0.5)
    b_gate = make.const(case.heads_q, value=0.0)
    counts = (torch.arange(case.seq_q, device=ctx.device) + offset + 1).clamp(0, case.seq_kv) if causal else \
        torch.full((case.seq_q,), case.seq_kv, device=ctx.device)
    counts = counts.float()[:, None]

    def gated(q, num, rows=None):
        t = counts if rows is None else counts[rows]
        g = torch.sigmoid((q.float() * w_gate.float()[None, :, None, :]).sum(-1, keepdim=True)
                          + b_gate.float()[None, :, None, None])
        return (g * num.float() / t.clamp_min(1.0)).to(num.dtype)

    def fn(q, k, v):
        num = polynomial_attention(q, k, v, weight=lambda s: torch.exp(s.clamp_max(clamp)), causal=causal,
                                   offset=offset, chunk=chunk, eps=0.0, normalize=False)
        return gated(q, num).to(v.dtype)

    def reference(q, k, v, rows=None):
        def weight(s):
            return torch.exp(torch.minimum(s, torch.full_like(s, clamp)))

        qr = q if rows is None else q[:, :, rows]
        num = polynomial_attention(q, k, v, weight=weight, causal=causal, offset=offset, chunk=ref_chunk, eps=0.0,
                                   normalize=False, rows=rows, compute=q.dtype)
        return gated(qr, num, rows)

    return Prepared(fn=fn, reference=reference, parameters=make.tensors, softmax_comparable=False)
