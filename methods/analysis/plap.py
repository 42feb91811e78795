"""p-Laplacian attention (p-adapter, Wu et al., AAAI 2024, arXiv:2312.10613; pGNN message passing;
methods-spec-3 §5), as a kernel, from the spec's equations (the released code never assigns its query and
key layers; nothing is taken from it).

``A = softmax(mask(q kᵀ/√d))``; node features ``F = v`` for the keys, and for the queries ``v`` (self) or
``q`` (cross: the bipartite graph's query nodes); per pair ``g_ij = ‖√(A_ij + e)(F_j − F_i) + e·1‖₂``
(e = 1e-8), ``M_ij = A_ij · g_ij^{p−2}``, ``α_i = 1/(Σ_j M_ij + 2μ/p)``, ``β_i = α_i·2μ/p``, and

    out_i = α_i Σ_j M_ij F_j + β_i F_i        (self);     out_i = α_i Σ_j M_ij F_j        (cross).

At p = 2, μ = 0 this is softmax attention exactly (the anchor). Causal is inherited (M = 0 where A = 0).
Parameters: ``p`` (init ``p``, default 1.5) and ``μ = μ₀(2 + tanh θ)`` (θ init 0, μ₀ = ``mu0``, default
0.1); both learnable when ``learnable`` (default false: their gradients are sums with heavy cancellation — the
self pair's ``ln g_ii ≈ −16`` — and two fp32 forms differ there by ~1e-4, the gate's fp32 gradient tolerance;
set ``learnable: true`` for training), else constants.

Fast path (no L×L×d tensor): ``‖a(F_j−F_i) + e·1‖² = a²‖F_j−F_i‖² + 2ea(ΣF_j − ΣF_i) + d·e²`` with
``‖F_j−F_i‖²`` from the Gram matrix, in query chunks (O(chunk·L) memory, checkpointed under autograd).
Reference: the explicit difference tensor ``[chunk, L, d]`` per query chunk (small chunks).
``g`` is clamped at ``e·√d`` before ``g^{p−2}``. Numerics: at p < 2 the weight ``g^{p−2}`` is very large for
near-duplicate features (g → e√d); the Gram form resolves distances only down to its rounding (~1e-7·‖F‖²
in fp32; ``gram_dtype=float64`` for more), and a node's distance to itself is set to 0 exactly.
Class N (E at p = 2, μ = 0).
"""
from __future__ import annotations

import torch

from ..contract import Prepared
from ..registry import Capabilities, register_method
from .common import (ParamMaker, by_query_chunks, default_chunk, expand_heads, mask_mode, param_choice, param_float,
                     param_int, row_visibility, scale_of)

E = 1e-8


def _weights(s, seen):
    if seen is not None:
        s = s.masked_fill(~seen, float("-inf"))
    a = torch.softmax(s, dim=-1)
    if seen is not None:
        a = a.masked_fill(~seen.any(-1, keepdim=True), 0.0)  # rows without keys: NaN -> 0
    return a


def plap_rows(qc, r0, r1, k, v, fq, p, mu, *, causal, offset, self_attn, gram: bool, gram_dtype=None):
    """One query chunk. ``fq``: the query rows' node features (None: the chunk's own rows of ``v``)."""
    s = (qc @ k.transpose(-1, -2)) * scale_of(qc.shape[-1])
    seen = row_visibility(r0, r1, k.shape[2], causal, offset, qc.device)
    a = _weights(s, seen)
    fi = fq  # [B, H, c, d]
    d = v.shape[-1]
    root = torch.sqrt(a + E)
    diag = None
    if self_attn:  # a node and itself: F_j - F_i is 0 identically, so g_ii = e·√d is a constant. Its
        # gradient paths through F_j and F_i cancel exactly but are ~g^(p-3) ≈ 1e10 large: cut them
        rows_idx = r0.to(qc.device) if isinstance(r0, torch.Tensor) else torch.arange(r0, r1, device=qc.device)
        diag = rows_idx[:, None] == torch.arange(v.shape[2], device=qc.device)[None, :]
    if gram:
        fg, vg = (fi, v) if gram_dtype is None else (fi.to(gram_dtype), v.to(gram_dtype))
        dist2 = ((fg * fg).sum(-1)[..., :, None] + (vg * vg).sum(-1)[..., None, :]
                 - 2 * fg @ vg.transpose(-1, -2)).to(fi.dtype)
        dist2 = dist2.clamp_min(0.0)
        cross_term = v.sum(-1)[..., None, :] - fi.sum(-1)[..., :, None]
        if diag is not None:  # also exactly 0 there (the Gram's rounding would leave ~1e-7·|F|²)
            dist2, cross_term = dist2.masked_fill(diag, 0.0), cross_term.masked_fill(diag, 0.0)
        g2 = (root * root) * dist2 + 2 * E * root * cross_term + d * E * E
        g = torch.sqrt(g2.clamp_min(d * E * E))
    else:
        diff = v[..., None, :, :] - fi[..., :, None, :]  # [B, H, c, L, d]
        if diag is not None:
            diff = diff.masked_fill(diag[..., None], 0.0)
        g = torch.linalg.vector_norm(root[..., None] * diff + E, dim=-1)
    g = g.clamp_min(E * d ** 0.5)
    m = a * g ** (p - 2)
    lam = 2 * mu / p
    alpha = 1.0 / (m.sum(-1, keepdim=True) + lam)
    out = alpha * (m @ v)
    if self_attn:
        out = out + alpha * lam * fi
    return out


@register_method("plap_attention", Capabilities(family="analysis", exact=False, masks={"full", "causal"}, cross=True,
                                                 gqa=True, backward=True, trainable=True),
                 options=("p", "mu0", "learnable", "gram_dtype", "chunk"))
def build_plap_attention(ctx):
    """p-Laplacian attention: softmax graph, edges reweighted by feature differences (Gram-matrix form)."""
    causal, offset = mask_mode(ctx)
    case = ctx.case
    p0 = param_float(ctx, "p", 1.5, minimum=1.0)
    mu0 = param_float(ctx, "mu0", 0.1, minimum=0.0)
    learnable = bool(ctx.param("learnable", False))
    gram_dtype = {"float32": None, "float64": torch.float64}[param_choice(ctx, "gram_dtype", "float32",
                                                                         ("float32", "float64"))]
    chunk = param_int(ctx, "chunk", default_chunk(case.seq_q, case.seq_kv, case.heads_q, case.batch, 1 << 26),
                      maximum=1 << 20)
    ref_budget = max(1, (1 << 26) // max(1, case.seq_kv * case.heads_q * case.batch * case.head_dim))
    ref_chunk = max(1, min(chunk // 2, ref_budget))
    self_attn = case.seq_q == case.seq_kv
    make = ParamMaker(case.seed, ctx.device)
    p_param = make.const(1, value=p0) if learnable else torch.full((1,), p0, device=ctx.device)
    theta = make.const(1, value=0.0) if learnable else torch.zeros(1, device=ctx.device)

    def scalars(dtype):
        p = p_param.to(dtype)
        return p, mu0 * (2 + torch.tanh(theta.to(dtype)))

    def run(q, k, v, *, gram, chunk_rows, rows=None, compute):
        heads = q.shape[1]
        k, v = expand_heads(k, heads).to(compute), expand_heads(v, heads).to(compute)
        q = q.to(compute)
        p, mu = scalars(compute)
        feats = v if self_attn else q

        def rows_fn(qc, r0, r1, k, v, feats, p, mu):
            fi = feats[:, :, r0] if r1 is None else feats[:, :, r0:r1]
            return plap_rows(qc, r0, r1, k, v, fi, p, mu, causal=causal, offset=offset, self_attn=self_attn,
                             gram=gram, gram_dtype=gram_dtype if gram else None)

        return by_query_chunks(rows_fn, q, chunk=chunk_rows, rows=rows, k=k, v=v, feats=feats, p=p, mu=mu)

    def fn(q, k, v):
        return run(q, k, v, gram=True, chunk_rows=chunk, compute=torch.float32).to(v.dtype)

    def reference(q, k, v, rows=None):
        return run(q, k, v, gram=False, chunk_rows=ref_chunk, rows=rows, compute=q.dtype)

    return Prepared(fn=fn, reference=reference, parameters=make.tensors, softmax_comparable=p0 == 2.0 and mu0 == 0.0)
