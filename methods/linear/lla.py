"""Local Linear Attention (Zuo et al., ICLR 2026, arXiv:2510.01450), §10: for each query a kernel-weighted
local linear regression of the values on the keys, evaluated at the query; the output is the intercept.

Weights ``p_ij = softmax_j(τ q_i·k_j)`` over the visible keys, ``μ_i = Σ p_ij k_j``, ``Σ_i = Σ p_ij
(k_j − μ_i)(k_j − μ_i)ᵀ``, ``ρ_i = (Σ_i + λ_i I)^(-1)(q_i − μ_i)``, ``o_i = Σ_j p_ij [1 + (k_j − μ_i)·ρ_i] v_j``
(equivalent weights sum to 1 and may be negative; λ → ∞ gives softmax attention). The ridge: ``relative``
(default; λ_i = λ, i.e. λ·s0 on the unnormalised weights) or ``absolute`` (λ_i = λ / s0_i, s0 = Σ exp(τ q·k))
— the paper's normalisation is unverified (methods-spec §17), so both are offered.

A different operator (class N): no approx_err. Forms: the reference centres the keys per query
(``[B, H, Lq, Lk, d]``) and solves directly; the fast path uses second moments (``Σ = Σ p k kᵀ − μ μᵀ``,
``[B, H, Lq, d, d]``), one batched solve, and rewrites the output as ``(P ⊙ (R Kᵀ)) V − (μ·ρ)(P V)``.
O(L² d² + L d³): short lengths only (``max_len``, default 512). FlashLLA's conjugate-gradient kernel is not
reproduced. Causal and full masks, cross attention. Hyper-parameters: ``ridge_lambda`` (default 1.0),
``ridge`` (relative | absolute), ``max_len``, ``scale`` (default 1/√d).
"""
from __future__ import annotations

import math

import torch

from ..contract import Prepared
from ..registry import Capabilities, Unsupported, register_method
from .common import LINEAR_MASKS, causal_visible, expand_heads, mask_mode, param_choice, param_float, param_int


def _weights(q, k, causal, offset, scale):
    logits = (q @ k.transpose(-1, -2)) * scale
    if causal:
        logits = logits.masked_fill(~causal_visible(q.shape[2], k.shape[2], offset, q.device), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    seen = torch.isfinite(lse)
    p = torch.exp(logits - torch.where(seen, lse, torch.zeros_like(lse)))
    return torch.where(seen, p, torch.zeros_like(p)), lse, seen


def _ridge(lse, seen, lam, absolute):
    if not absolute:
        return torch.full_like(lse, lam)
    return torch.where(seen, lam * torch.exp(-lse), torch.full_like(lse, lam))


def lla_reference(q, k, v, *, causal, offset, scale, lam, absolute):
    k, v = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
    p, lse, seen = _weights(q, k, causal, offset, scale)
    mu = p @ k  # [B, H, Lq, d]
    centred = k[:, :, None, :, :] - mu[:, :, :, None, :]  # [B, H, Lq, Lk, d]
    sigma = torch.einsum("bhij,bhijd,bhije->bhide", p, centred, centred)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    rho = torch.linalg.solve(sigma + _ridge(lse, seen, lam, absolute)[..., None] * eye, (q - mu)[..., None])[..., 0]
    weights = p * (1.0 + (centred * rho[:, :, :, None, :]).sum(-1))
    return weights @ v


def lla_fast(q, k, v, *, causal, offset, scale, lam, absolute):
    dtype = q.dtype
    qf, kf, vf = q.float(), expand_heads(k, q.shape[1]).float(), expand_heads(v, q.shape[1]).float()
    p, lse, seen = _weights(qf, kf, causal, offset, scale)
    mu = p @ kf
    second = torch.einsum("bhij,bhjd,bhje->bhide", p, kf, kf)
    sigma = second - mu[..., :, None] * mu[..., None, :]
    eye = torch.eye(q.shape[-1], device=q.device)
    rho = torch.linalg.solve(sigma + _ridge(lse, seen, lam, absolute)[..., None] * eye, (qf - mu)[..., None])[..., 0]
    pv = p @ vf
    out = (p * (rho @ kf.transpose(-1, -2))) @ vf - (mu * rho).sum(-1, keepdim=True) * pv + pv
    return out.to(dtype)


@register_method("lla", Capabilities(family="linear", exact=False, masks=LINEAR_MASKS, cross=True, gqa=True,
                                      backward=True), options=("max_len", "ridge_lambda", "ridge", "scale"))
def build_lla(ctx):
    """Local Linear Attention: per-query weighted local linear regression (direct solve; short lengths)."""
    causal, offset = mask_mode(ctx)
    case = ctx.case
    max_len = param_int(ctx, "max_len", 512, minimum=1)
    lam = param_float(ctx, "ridge_lambda", 1.0, minimum=0.0, strict_min=True)
    absolute = param_choice(ctx, "ridge", "relative", ("relative", "absolute")) == "absolute"
    scale = param_float(ctx, "scale", 1.0 / math.sqrt(case.head_dim), minimum=0.0)
    if max(case.seq_q, case.seq_kv) > max_len:
        raise Unsupported(f"LLA's direct solve costs O(L² d² + L d³): length {max(case.seq_q, case.seq_kv)} is over "
                          f"method_options.lla.max_len={max_len}")
    kw = dict(causal=causal, offset=offset, scale=scale, lam=lam, absolute=absolute)
    return Prepared(fn=lambda q, k, v: lla_fast(q, k, v, **kw), reference=lambda q, k, v: lla_reference(q, k, v, **kw),
                    softmax_comparable=False)
