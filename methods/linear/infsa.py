"""Infinite Self-Attention (Roffo, arXiv:2603.00175), §8: pure InfSA and Linear-InfSA. Class N (not softmax):
no approx_err. ρ is a learnable scalar per layer through a sigmoid (initial ``rho``, default 0.95).

- ``infsa`` (pure, O(N² d)): ``Â = ReLU(Q Kᵀ/d) / (‖ReLU(Q Kᵀ/d)‖_F + ε)`` per (batch, head), ``O = ρ Â V``
  (no row normalisation, ε = 1e-6). Full mask only: a causal mask applied before the Frobenius norm (the
  spec's "extension") still lets every output depend on future keys through the norm, so it is not causal
  and is not offered. The fast path makes two passes over query-row blocks (norm, then output) and never
  holds the L×L matrix; the reference materialises it.
- ``linear_infsa`` (O(N d)): ``w_i = ‖q_i‖/Σ‖q‖``, ``q̄ = Σ w_i q_i/√d``, ``a_j = ReLU(q̄·k_j/√d)/(Σ ReLU + ε)``,
  ``o = ρ Σ a_j v_j`` broadcast to every query (rank-1 output). Full mask only (q̄ pools every query: no
  faithful causal form). The fast path fuses the reductions; the reference spells them out (its ``rows=`` form,
  :func:`linear_rows`, returns the same context on sampled rows).
Hyper-parameters: ``rho`` (0 < ρ < 1), ``eps``, ``block`` (query rows per pass of the pure fast path).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..registry import Capabilities, register_method
from .common import expand_heads, param_float, param_int


def _rho_parameter(ctx):
    rho = param_float(ctx, "rho", 0.95, minimum=0.0, strict_min=True)
    if rho >= 1.0:
        raise ValueError(f"method_options.{ctx.case.method}.rho: must be < 1, got {rho}")
    return torch.tensor(math.log(rho / (1 - rho)), device=ctx.device).requires_grad_(True)


def pure_reference(q, k, v, rho_logit, eps):
    k, v = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
    scores = F.relu(q @ k.transpose(-1, -2) / q.shape[-1])
    norm = torch.sqrt((scores * scores).sum((-1, -2), keepdim=True))
    return torch.sigmoid(rho_logit.to(q.dtype)) * (scores / (norm + eps)) @ v


def pure_blocked(q, k, v, rho_logit, eps, block):
    dtype = q.dtype
    qf, kf, vf = q.float(), expand_heads(k, q.shape[1]).float(), expand_heads(v, q.shape[1]).float()
    scale = 1.0 / q.shape[-1]
    square = qf.new_zeros(*q.shape[:2], 1, 1)
    for r0 in range(0, q.shape[2], block):
        s = F.relu(qf[:, :, r0:r0 + block] @ kf.transpose(-1, -2) * scale)
        square = square + (s * s).sum((-1, -2), keepdim=True)
    factor = torch.sigmoid(rho_logit.float()) / (torch.sqrt(square) + eps)
    outs = [F.relu(qf[:, :, r0:r0 + block] @ kf.transpose(-1, -2) * scale) @ vf
            for r0 in range(0, q.shape[2], block)]
    return (factor * torch.cat(outs, dim=2)).to(dtype)


def linear_reference(q, k, v, rho_logit, eps):
    k, v = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
    d = q.shape[-1]
    norms = q.norm(dim=-1)  # [B, H, Lq]
    weights = norms / norms.sum(-1, keepdim=True)
    pooled = (weights[..., None] * q).sum(2) / math.sqrt(d)  # [B, H, D]
    relu = F.relu((k * pooled[:, :, None, :]).sum(-1) / math.sqrt(d))  # [B, H, Lk]
    attn = relu / (relu.sum(-1, keepdim=True) + eps)
    context = (attn[..., None] * v).sum(2)  # [B, H, Dv]
    rho = torch.sigmoid(rho_logit.to(q.dtype))
    return (rho * context)[:, :, None, :].expand(-1, -1, q.shape[2], -1)


def linear_fused(q, k, v, rho_logit, eps):
    dtype = q.dtype
    qf, kf, vf = q.float(), expand_heads(k, q.shape[1]).float(), expand_heads(v, q.shape[1]).float()
    d = q.shape[-1]
    norms = torch.linalg.vector_norm(qf, dim=-1, keepdim=True)  # [B, H, Lq, 1]
    pooled = (norms.transpose(-1, -2) @ qf) / (norms.sum(2, keepdim=True) * math.sqrt(d))  # [B, H, 1, D]
    relu = F.relu(pooled @ kf.transpose(-1, -2) / math.sqrt(d))  # [B, H, 1, Lk]
    context = (relu @ vf) / (relu.sum(-1, keepdim=True) + eps)
    out = torch.sigmoid(rho_logit.float()) * context
    return out.expand(-1, -1, q.shape[2], -1).to(dtype)


CAPS = dict(family="linear", exact=False, masks={"full"}, cross=True, gqa=True, backward=True, trainable=True)


@register_method("infsa", Capabilities(**CAPS), options=("rho", "eps", "block"))
def build_infsa(ctx):
    """Pure InfSA: ReLU scores over their Frobenius norm, times a learnable rho (O(N^2 d), full mask)."""
    rho = _rho_parameter(ctx)
    eps = param_float(ctx, "eps", 1e-6, minimum=0.0)
    block = param_int(ctx, "block", 4096, minimum=1)
    return Prepared(fn=lambda q, k, v: pure_blocked(q, k, v, rho, eps, block),
                    reference=lambda q, k, v: pure_reference(q, k, v, rho, eps), parameters=[rho],
                    softmax_comparable=False)


def linear_rows(q, k, v, rho_logit, eps, rows):
    """:func:`linear_reference` at query rows ``rows`` (``[B, H, len(rows), Dv]``, fp32): the pooled query
    still pools every query and the context reads every key (O(L · d) time and memory, as the full reference:
    only the rank-1 broadcast shrinks, from ``[B, H, Lq, Dv]`` to the rows)."""
    context = linear_reference(q.float(), k.float(), v.float(), rho_logit.float(), eps)[:, :, :1]
    return context.expand(-1, -1, rows.numel(), -1)


@register_method("linear_infsa", Capabilities(**CAPS), options=("rho", "eps"))
def build_linear_infsa(ctx):
    """Linear-InfSA: one pooled query, ReLU attention, the context vector broadcast (O(N d), full mask)."""
    rho = _rho_parameter(ctx)
    eps = param_float(ctx, "eps", 1e-6, minimum=0.0)
    return Prepared(fn=lambda q, k, v: linear_fused(q, k, v, rho, eps),
                    reference=lambda q, k, v, rows=None: (linear_reference(q, k, v, rho, eps) if rows is None
                                                          else linear_rows(q, k, v, rho, eps, rows).to(q.dtype)),
                    parameters=[rho],
                    softmax_comparable=False)
