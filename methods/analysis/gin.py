"""GIN-Attention (Buehler, arXiv:2501.02393; methods-spec-3 §1a), a layer over x ``[B, L, H·d]``, written
from the spec's description (no code taken from lamm-mit/Graph-Aware-Transformers).

Per head h: ``q = rope(x W_q^h)``, ``k = rope(x W_k^h)``, node features ``x^h`` = the head's slice of the
input (no value projection), ``A = softmax(mask(α · q kᵀ / (T √d)))`` with a learnable sharpening scalar α
(init ``alpha_init``, 1.0) and a fixed temperature T (1.0); aggregate ``a = A x^h``; GIN update
``u = ε_h x^h + a`` (learnable ε_h, init 0: the code's ε·x form); ``y^h = MLP_h(u)`` with ``MLP_h`` =
Linear(d → m·d) → RMSNorm(m·d) → SiLU → Linear(m·d → d) (dropout omitted; m = ``mult``, default 2 as the
code); heads concatenated, no output projection (the code's default).

**Mask order.** The causal mask is applied *after* the sharpening (``mask_order="after"``, the paper's
semantics). The released code adds its finite additive mask *before* multiplying by α (``mask_order=
"released"``, kept as a flag): when α turns negative the masked logits become the largest and the layer
attends to the future. ``tests/test_analysis_methods.py`` checks causality with α < 0 and that the released
order fails it.

Fast path: ``SDPA(α·q, k, x^h, scale=1/(T√d))`` in the working dtype (α folded into q keeps its gradient; no
L×L matrix), everything around it (projections, rope, GIN update, per-head MLPs as batched einsums) in fp32.
**α's gradient in half precision.** It is a sum over every (query, key) pair of ``dS ∘ S`` that cancels: a bf16
attention call (even an fp32 kernel on bf16-rounded q and k) leaves it 0.1–4 % off, seed-dependent, beyond the
bf16 gate, so a bf16 fwd_bwd row can be ``wrong`` on α alone. That is the layer's true behaviour in bf16 and the
default keeps it (``attention_dtype="input"``); ``attention_dtype="float32"`` runs the attention call in fp32
(q, k, x^h never rounded), the price of a correct α gradient (``tests/test_gin_precision.py`` measures both).
Reference: the materialised A per head (query-chunked). The ``released`` order has no fused form: both paths
materialise. ``mlp="identity"`` (with ε = 0) makes the layer ``SDPA(q, k, x heads)``: the exactness anchor. Class N. Hyper-parameters: ``mult``, ``alpha_init``,
``temperature``, ``mask_order``, ``mlp`` (``gin`` | ``identity``), ``rope`` (default true), ``attention_dtype``
(``input`` | ``float32``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..registry import Capabilities, register_method
from .common import (ParamMaker, by_query_chunks, default_chunk, mask_mode, merge_heads, param_choice, param_float,
                     param_int, rms_norm, rope, row_visibility, self_only, split_heads)


def gin_mlp(u, w1, b1, g, w2, b2):
    """Per-head MLP over u ``[B, H, L, d]``: Linear -> RMSNorm -> SiLU -> Linear, weights per head."""
    h = torch.einsum("bhld,hdm->bhlm", u, w1) + b1[None, :, None, :]
    h = F.silu(rms_norm(h) * g[None, :, None, :])
    return torch.einsum("bhlm,hmd->bhld", h, w2) + b2[None, :, None, :]


def materialized_aggregate(q, k, x, alpha, *, temperature: float, causal: bool, order: str, chunk: int, rows=None):
    """``A x`` with ``A = softmax(α·S/T)`` masked after (``order='after'``) or before the scaling (``'released'``:
    a finite additive mask of the dtype's minimum, added to S, then multiplied by α, as the released code)."""
    scale = 1.0 / (temperature * q.shape[-1] ** 0.5)
    seq_kv = k.shape[2]

    def rows_fn(qc, r0, r1, k, x, alpha):
        s = qc @ k.transpose(-1, -2) * scale
        seen = row_visibility(r0, r1, seq_kv, causal, 0, qc.device)
        if order == "released":
            if seen is not None:
                s = s + torch.zeros_like(s).masked_fill(~seen, torch.finfo(s.dtype).min)
            logits = alpha * s
        else:
            logits = alpha * s
            if seen is not None:
                logits = logits.masked_fill(~seen, float("-inf"))
        return torch.softmax(logits, dim=-1) @ x

    return by_query_chunks(rows_fn, q, chunk=chunk, rows=rows, k=k, x=x, alpha=alpha)


@register_method("gin_attention", Capabilities(family="analysis", exact=False, form="layer", masks={"full", "causal"},
                                                backward=True, trainable=True),
                 options=("mult", "alpha_init", "temperature", "mask_order", "mlp", "rope", "attention_dtype", "chunk"))
def build_gin_attention(ctx):
    """GIN-Attention: softmax aggregation of the input (learnable sharpening, mask after it), per-head GIN MLP."""
    causal, _ = mask_mode(ctx)
    self_only(ctx, "a self-attention layer")
    case = ctx.case
    heads, d = case.heads_q, case.head_dim
    width = heads * d
    mult = param_float(ctx, "mult", 2.0, minimum=0.0, strict_min=True)
    hidden = max(1, round(mult * d))
    alpha_init = param_float(ctx, "alpha_init", 1.0)
    temperature = param_float(ctx, "temperature", 1.0, minimum=0.0, strict_min=True)
    order = param_choice(ctx, "mask_order", "after", ("after", "released"))
    mlp = param_choice(ctx, "mlp", "gin", ("gin", "identity"))
    use_rope = bool(ctx.param("rope", True))
    attention_dtype = param_choice(ctx, "attention_dtype", "input", ("input", "float32"))
    chunk = param_int(ctx, "chunk", default_chunk(case.seq_q, case.seq_kv, heads, case.batch), maximum=1 << 20)
    ref_chunk = max(1, chunk // 2)
    make = ParamMaker(case.seed, ctx.device)
    w_q = make.randn(width, width, std=width ** -0.5)
    w_k = make.randn(width, width, std=width ** -0.5)
    alpha = make.const(1, value=alpha_init)
    eps = make.const(heads, value=0.0)
    mlp_params = []
    if mlp == "gin":
        mlp_params = [make.randn(heads, d, hidden, std=d ** -0.5), make.const(heads, hidden, value=0.0),
                      make.const(heads, hidden, value=1.0), make.randn(heads, hidden, d, std=hidden ** -0.5),
                      make.const(heads, d, value=0.0)]
    positions = torch.arange(case.seq_q, device=ctx.device)

    def project(x, dtype):
        q = split_heads(x @ w_q.to(dtype), heads)
        k = split_heads(x @ w_k.to(dtype), heads)
        if use_rope:
            q, k = rope(q, positions), rope(k, positions)
        return q, k, split_heads(x, heads)

    def update(xh, agg, dtype):
        u = eps.to(dtype)[None, :, None, None] * xh + agg
        if mlp == "gin":
            u = gin_mlp(u, *(p.to(dtype) for p in mlp_params))
        return merge_heads(u)

    def fast(x):
        # Mixed precision, as a kernel engineer would run it: the attention call (the O(L²) part) in the working
        # dtype; the projections, rope, α, the GIN update and the MLP (RMSNorm's reduction over m·d, the
        # per-head einsums) and so every parameter-gradient reduction over the tokens in fp32. All in bf16,
        # their roundings compound to dx rel_err 0.0102 > 0.009 at 4K on the H200 (CPU: 0.0106 at 2K).
        dtype = x.dtype
        work = torch.promote_types(dtype, torch.float32)  # fp32 around a half-precision attention, else x's dtype
        inner = work if attention_dtype == "float32" else dtype  # the attention call's dtype (α's gradient: below)
        q, k, xh = project(x.to(work), work)
        if order == "after":
            agg = F.scaled_dot_product_attention((q * alpha).to(inner), k.to(inner), xh.to(inner), is_causal=causal,
                                                 scale=1.0 / (temperature * d ** 0.5))
        else:
            agg = materialized_aggregate(q, k, xh, alpha.to(work), temperature=temperature, causal=causal,
                                         order=order, chunk=chunk)
        return update(xh, agg.to(work), work).to(dtype)

    def reference(x):
        q, k, xh = project(x, x.dtype)
        agg = materialized_aggregate(q, k, xh, alpha.to(x.dtype), temperature=temperature, causal=causal,
                                     order=order, chunk=ref_chunk)
        return update(xh, agg, x.dtype)

    seq = case.seq_q
    pairs = seq * (seq + 1) / 2 if causal else seq * seq
    flops = case.batch * (4.0 * seq * width * width + 4.0 * pairs * width
                          + (4.0 * seq * heads * d * hidden if mlp == "gin" else 0.0))
    return Prepared(fn=fast, reference=reference, parameters=make.tensors, flops=flops, softmax_comparable=False)


# ---- precision probe (tests/test_gin_precision.py, scripts/gin_alpha_check.py) ----------------------------------
ALPHA_INDEX = 2  # index of the sharpening scalar α in Prepared.parameters (w_q, w_k, alpha, eps, mlp...)


def gradient_errors(mask: str, seq: int = 1024, heads: int = 2, dim: int = 64, seed: int = 0, params=None):
    """gin_attention in bf16 on the CPU against its fp32 reference: ``(output rel_err, {"dx": ..., "dparam<i>":
    ...})``, the relative error of the output and of each gradient (``dparam{ALPHA_INDEX}`` is α's), for one
    random input at ``seq`` tokens and the given method options ``params``."""
    from types import SimpleNamespace

    from attnbench import masks
    from attnbench.measure.gate import rel_error

    from .. import METHODS, BuildContext, MaskInfo, as_prepared

    bound = masks.make_mask(mask).bind(seq, seq)
    case = SimpleNamespace(method="gin_attention", batch=1, heads_q=heads, heads_kv=heads, seq_q=seq, seq_kv=seq,
                           head_dim=dim, seed=seed, dtype="bfloat16")
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                       dtype=torch.bfloat16, params=dict(params or {}))
    prepared = as_prepared(METHODS["gin_attention"].build(ctx))
    tensors = list(prepared.parameters)
    if tensors[ALPHA_INDEX].numel() != 1:
        raise RuntimeError("gin_attention's parameter layout changed: α is no longer parameters[ALPHA_INDEX]")
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, seq, heads * dim, generator=gen).to(torch.bfloat16)
    dout = torch.randn(1, seq, heads * dim, generator=gen)
    xb = x.clone().requires_grad_()
    out = prepared.fn(xb)
    got = torch.autograd.grad(out, [xb] + tensors, dout.to(torch.bfloat16))
    xf = x.float().requires_grad_()
    ref = prepared.reference(xf)
    want = torch.autograd.grad(ref, [xf] + tensors, dout)
    names = ["dx"] + [f"dparam{i}" for i in range(len(tensors))]
    return rel_error(out, ref), {n: rel_error(g, w) for n, g, w in zip(names, got, want)}
