"""DSF normalized attention (Sieber et al., NeurIPS 2024, arXiv:2405.15731; methods-spec-3 §11), from the
paper's equation: unnormalised linear attention whose data-dependent denominator is replaced by a learned
function of the current token,

    o_i = η(n_i) · q_iᵀ Σ_{j ∈ C_i} k_j v_jᵀ,     n_i = W_n u_i  (one scalar per head and position),

with ``η ∈ {exp(−n), 1/softplus(n), 1 + exp(−n)}`` (``eta``: ``exp`` (the paper's best), ``softplus``,
``sigmoid``; ``one`` is η ≡ 1, unnormalised linear attention: the exactness anchor). Raw q·k: no feature map,
no 1/√d. ``C_i``: keys ``j <= i`` (causal, the paper's) or every key (full mask).

Kernel form: the layer input u is not an argument of a q/k/v kernel, so ``n_i = ⟨q_i, w_n⟩ + b_n`` per head
(learned ``w_n [H, d]`` (init std ``eta_init_std``, default 0.02), ``b_n [H]`` (init ``eta_bias``, default 0
for exp: η ≈ 1)); since ``q_i = W_q u_i`` this is ``W_n = w_nᵀ W_q``, a W_n restricted to the row space of
the query projection (our adaptation, stated).

Forms: parallel ``(QKᵀ ⊙ M) V`` scaled per row by η (the reference, query-chunked), recurrent: the chunked
cumulative state ``S_i = Σ_{j≤i} k_j v_jᵀ`` (fp32 states; the fast path) and an O(d_k·d_v) decode step.
Class N (``softmax_comparable=False``). Hyper-parameters: ``eta``, ``eta_init_std``, ``eta_bias``, ``chunk``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contract import Prepared, RecurrentDecode
from ..linear.common import chunked_linear
from ..registry import Capabilities, register_method
from .common import ParamMaker, default_chunk, expand_heads, mask_mode, param_choice, param_float, param_int
from .taylor import polynomial_attention

ETAS = ("exp", "softplus", "sigmoid", "one")


def eta_of(n: torch.Tensor, eta: str) -> torch.Tensor:
    if eta == "exp":
        return torch.exp(-n)
    if eta == "softplus":
        return 1.0 / F.softplus(n)
    if eta == "sigmoid":
        return 1.0 + torch.exp(-n)
    return torch.ones_like(n)


def unnormalized_parallel(q, k, v, *, causal, offset, chunk, rows=None):
    """``(q kᵀ ⊙ M) v`` with raw logits (no scale), query-chunked, in q's dtype."""
    d = q.shape[-1]
    # polynomial_attention scales logits by 1/√d; undo it so the weight is the raw q·k
    return polynomial_attention(q, k, v, weight=lambda s: s * d ** 0.5, causal=causal, offset=offset, chunk=chunk,
                                eps=0.0, normalize=False, rows=rows, compute=q.dtype)


def token_recurrence(q, k, v, eta_values, *, offset: int = 0):
    """The recurrent form one token at a time (causal self, readable): ``S += k_t v_tᵀ``, ``o_t = η_t q_tᵀ S``."""
    heads = q.shape[1]
    k, v = expand_heads(k, heads).float(), expand_heads(v, heads).float()
    S = torch.zeros(q.shape[0], heads, q.shape[-1], v.shape[-1], dtype=torch.float32, device=q.device)
    outs = []
    for t in range(q.shape[2]):
        S = S + k[:, :, t + offset, :, None] * v[:, :, t + offset, None, :]
        outs.append(eta_values[:, :, t, None] * (q[:, :, t, None, :].float() @ S)[:, :, 0])
    return torch.stack(outs, dim=2)


@register_method("normalized_attention", Capabilities(family="analysis", exact=False, masks={"full", "causal", "decode"},
                                                       gqa=True, backward=True, decode=True, trainable=True),
                 options=("eta", "chunk", "eta_init_std", "eta_bias"))
def build_normalized_attention(ctx):
    """DSF normalized attention: η(n_i)·q_iᵀΣ k_j v_jᵀ (exp/softplus/sigmoid η; chunked state; O(d²) decode)."""
    causal, offset = mask_mode(ctx)
    case = ctx.case
    eta = param_choice(ctx, "eta", "exp", ETAS)
    chunk = param_int(ctx, "chunk", 64, maximum=4096)
    ref_chunk = max(1, default_chunk(case.seq_q, case.seq_kv, case.heads_q, case.batch) // 2)
    std = param_float(ctx, "eta_init_std", 0.02, minimum=0.0)
    bias = param_float(ctx, "eta_bias", 0.0)
    make = ParamMaker(case.seed, ctx.device)
    w_n = make.randn(case.heads_q, case.head_dim, std=std)
    b_n = make.const(case.heads_q, value=bias)

    def eta_values(q):  # [B, H, Sq] fp32
        n = (q.float() * w_n.float()[None, :, None, :]).sum(-1) + b_n.float()[None, :, None]
        return eta_of(n, eta)

    def fn(q, k, v):
        heads = q.shape[1]
        num = chunked_linear(q, expand_heads(k, heads), expand_heads(v, heads), causal=causal, offset=offset,
                             eps=0.0, chunk=chunk, normalize=False)
        return (eta_values(q)[..., None] * num.float()).to(v.dtype)

    def reference(q, k, v, rows=None):
        num = unnormalized_parallel(q, k, v, causal=causal, offset=offset, chunk=ref_chunk, rows=rows)
        qr = q if rows is None else q[:, :, rows]
        return (eta_values(qr)[..., None].to(num.dtype) * num).to(v.dtype)

    decode = None
    if causal:
        def prefill(q, k, v):
            heads = q.shape[1]
            kk, vv = expand_heads(k[:, :, :-1], heads).float(), expand_heads(v[:, :, :-1], heads).float()
            return kk.transpose(-1, -2) @ vv

        def step(state, q, k, v):
            heads = q.shape[1]
            kk, vv = expand_heads(k[:, :, -1:], heads).float(), expand_heads(v[:, :, -1:], heads).float()
            S = state + kk.transpose(-1, -2) @ vv
            qq = q[:, :, -1:]
            return (eta_values(qq)[..., None] * (qq.float() @ S)).to(v.dtype)

        decode = RecurrentDecode(prefill=prefill, step=step,
                                 state_bytes=lambda s: s[0].numel() * s.element_size())
    return Prepared(fn=fn, reference=reference, parameters=make.tensors, decode=decode, softmax_comparable=False)
