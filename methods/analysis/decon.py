"""Deconstructing Attention (Xue, Moosavi, Aletras, arXiv:2510.11602; methods-spec-3 §2): the variants that
are operators. (The fixed-map variants RndEmbQK, FixedSeqQK and StaticEmbQK take Q and K from another
sequence than the layer input — a reference sequence run through the stack, or the token embeddings — so
they do not fit a q/k/v kernel or a layer over x alone: they are task-model options, ``qk_source`` in
``attnbench.tasks.model``.)

``decon_mlp`` (layer, class N, *Token Mixing* relaxed): ``O = FC_dn(SiLU(FC_gt x) ⊙ FC_up x)``, every token
alone; hidden width ``d' = round(4·d/3)`` so that 3·d·d' ≈ 4·d², the parameters of W_Q, W_K, W_V, W_O (our
derivation). fp32 matmuls in both forms (the same computation; no separate fast form).

``taylor2_attention`` (kernel, class A, *Mathematical Form* kept in intent): 2nd-order Taylor of exp,
linear-time. ``normalization``: ``joint`` (Based: one normaliser over the map ``[1, x, x⊗x/√2]``, = the
``taylor_softmax`` of order 2) or ``separate`` (the paper's App. I as printed: ``o = o⁰ + o¹ + o²``, each
normalised by its own denominator: o⁰ the prefix mean of v, o¹ with features q, k, o² with q⊗q/√2, k⊗k/√2;
which one the released code uses is unverified). Fast: the chunked linear-attention form with fp32 states;
reference: the parallel polynomial of the score matrix, term by term. The ``separate`` o¹ denominator
``q_i·Σ_j k_j`` can be zero or negative (as printed): expect large values there.

``decon_nonapprox`` (kernel, class N, *Mathematical Form* abandoned; self only): a scalar score per token,
``s_j = Σ_c (SiLU(q_j) ⊙ k_j)_c / √d``, softmax over the key index only: ``o_i = Σ_{j≤i} e^{s_j} v_j /
Σ_{j≤i} e^{s_j}`` (Eq. 18; every key under the full mask). The SiLU of the paper's ``Q = SiLU(H W_Q)`` is
applied inside. Fast: the recurrent scan (running max, numerator, denominator) by chunks of keys, O(L·d);
reference: the parallel masked softmax over the broadcast score row, O(L²). Hyper-parameters: ``chunk``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..linear.common import chunked_linear
from ..registry import Capabilities, register_method
from .common import (ParamMaker, by_query_chunks, default_chunk, expand_heads, mask_mode, param_choice, param_int,
                     row_visibility, scale_of, self_only)
from .taylor import ANALYSIS_KERNEL, polynomial_attention, taylor_features, taylor_weights


# ---- decon_mlp ---------------------------------------------------------------------------------------------------
@register_method("decon_mlp", Capabilities(family="analysis", exact=False, form="layer", masks={"full", "causal"},
                                            backward=True, trainable=True), options=("hidden",))
def build_decon_mlp(ctx):
    """Deconstructing Attention's MLP variant: a gated MLP per token in place of attention (no token mixing)."""
    mask_mode(ctx)
    self_only(ctx, "a per-token layer")
    case = ctx.case
    width = case.heads_q * case.head_dim
    hidden = param_int(ctx, "hidden", max(1, round(4 * width / 3)))
    make = ParamMaker(case.seed, ctx.device)
    w_gate = make.randn(hidden, width, std=width ** -0.5)
    w_up = make.randn(hidden, width, std=width ** -0.5)
    w_down = make.randn(width, hidden, std=hidden ** -0.5)

    def fast(x):
        h = x.float()
        return F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down).to(x.dtype)

    def reference(x):
        gate = torch.einsum("bld,hd->blh", x, w_gate.to(x.dtype))
        up = torch.einsum("bld,hd->blh", x, w_up.to(x.dtype))
        return torch.einsum("blh,dh->bld", gate * torch.sigmoid(gate) * up, w_down.to(x.dtype))

    flops = case.batch * case.seq_q * 2.0 * 3 * width * hidden
    return Prepared(fn=fast, reference=reference, parameters=make.tensors, flops=flops, softmax_comparable=False)


# ---- taylor2_attention -------------------------------------------------------------------------------------------
def outer_features(x: torch.Tensor) -> torch.Tensor:
    """x⊗x/√2, flattened, fp32."""
    x = x.float()
    return (x[..., :, None] * x[..., None, :]).flatten(-2) / 2 ** 0.5


@register_method("taylor2_attention", Capabilities(**ANALYSIS_KERNEL), options=("normalization", "chunk"))
def build_taylor2_attention(ctx):
    """2nd-order Taylor attention (Based-style feature map; joint or separately normalised terms), linear time."""
    causal, offset = mask_mode(ctx)
    case = ctx.case
    normalization = param_choice(ctx, "normalization", "joint", ("joint", "separate"))
    chunk = param_int(ctx, "chunk", 256, maximum=4096)
    eps = 1e-6
    heads = case.heads_q
    ref_chunk = max(1, default_chunk(case.seq_q, case.seq_kv, heads, case.batch) // 2)

    def lin(fq, fk, v):
        return chunked_linear(fq, fk, v, causal=causal, offset=offset, eps=eps, chunk=chunk).float()

    def fn(q, k, v):
        k, v = expand_heads(k, heads), expand_heads(v, heads)
        if normalization == "joint":
            return lin(taylor_features(q, 2), taylor_features(k, 2), v).to(v.dtype)
        ones_q = torch.ones(*q.shape[:-1], 1, device=q.device)
        ones_k = torch.ones(*k.shape[:-1], 1, device=k.device)
        o0 = lin(ones_q, ones_k, v)
        o1 = lin(q.float(), k.float(), v)
        o2 = lin(outer_features(q), outer_features(k), v)
        return (o0 + o1 + o2).to(v.dtype)

    def reference(q, k, v, rows=None):
        def term(weight):
            return polynomial_attention(q, k, v, weight=weight, causal=causal, offset=offset, chunk=ref_chunk,
                                        eps=eps, rows=rows, compute=q.dtype)

        if normalization == "joint":
            return term(lambda s: taylor_weights(s, 2))
        return term(torch.ones_like) + term(lambda s: s) + term(lambda s: s * s / 2)

    return Prepared(fn=fn, reference=reference)


# ---- decon_nonapprox ---------------------------------------------------------------------------------------------
def token_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``s_j = Σ_c SiLU(q_j)_c k_{j,c} / √d`` -> [B, H, L] (GQA expanded), fp32."""
    k = expand_heads(k, q.shape[1])
    return (F.silu(q.float()) * k.float()).sum(-1) * scale_of(q.shape[-1])


def prefix_softmax_scan(s: torch.Tensor, v: torch.Tensor, *, causal: bool, chunk: int) -> torch.Tensor:
    """The recurrent form: keys ``chunk`` at a time, state (running max m, numerator, denominator); within a
    chunk, cumulative sums against the chunk's max. fp32; [B, H, L, Dv]."""
    v = v.float()
    if not causal:  # every query pools every key
        w = torch.softmax(s, dim=-1)
        return (w[..., None] * v).sum(2, keepdim=True).expand_as(v)
    batch, heads, length = s.shape
    m = torch.full((batch, heads, 1), float("-inf"), device=s.device)
    num = torch.zeros(batch, heads, 1, v.shape[-1], device=s.device)
    den = torch.zeros(batch, heads, 1, device=s.device)
    outs = []
    for j0 in range(0, length, chunk):
        sc, vc = s[:, :, j0:j0 + chunk], v[:, :, j0:j0 + chunk]
        m_new = torch.maximum(m, sc.amax(-1, keepdim=True)).detach()
        decay = torch.exp(m - m_new)
        w = torch.exp(sc - m_new)
        cnum = num * decay[..., None] + torch.cumsum(w[..., None] * vc, dim=2)
        cden = den * decay + torch.cumsum(w, dim=2)
        outs.append(cnum / cden[..., None])
        m, num, den = m_new, cnum[:, :, -1:], cden[:, :, -1:]
    return torch.cat(outs, dim=2)


@register_method("decon_nonapprox", Capabilities(family="analysis", exact=False, masks={"full", "causal"}, gqa=True,
                                                  backward=True), options=("chunk",))
def build_decon_nonapprox(ctx):
    """Deconstructing Attention's non-approximate variant: per-token scalar scores, softmax over keys only."""
    causal, _ = mask_mode(ctx)
    self_only(ctx, "defined for self-attention: key j's score needs query j")
    case = ctx.case
    chunk = param_int(ctx, "chunk", 256, maximum=1 << 20)
    ref_chunk = max(1, default_chunk(case.seq_q, case.seq_kv, case.heads_q, case.batch) // 2)

    def fn(q, k, v):
        return prefix_softmax_scan(token_scores(q, k), expand_heads(v, q.shape[1]), causal=causal,
                                   chunk=chunk).to(v.dtype)

    def reference(q, k, v, rows=None):
        s = (F.silu(q) * expand_heads(k, q.shape[1])).sum(-1) * scale_of(q.shape[-1])  # [B, H, L], q's dtype
        v = expand_heads(v, q.shape[1])

        def rows_fn(qc, r0, r1, s, v):
            logits = s[:, :, None, :].expand(-1, -1, qc.shape[2], -1)
            seen = row_visibility(r0, r1, s.shape[-1], causal, 0, s.device)
            if seen is not None:
                logits = logits.masked_fill(~seen, float("-inf"))
            return torch.softmax(logits, dim=-1) @ v

        return by_query_chunks(rows_fn, q, chunk=ref_chunk, rows=rows, s=s, v=v)

    return Prepared(fn=fn, reference=reference, softmax_comparable=False)
