"""RFA, Random Feature Attention (Peng et al., ICLR 2021, arXiv:2103.02143), methods-spec §12c.

q and k are ℓ2-normalised; ``φ(x) = √(1/D) [sin(ω_i·x), cos(ω_i·x)]_{i≤D}`` with ``ω = ε/σ``, ε ~ N(0, I),
so ``φ(q)·φ(k) ≈ exp(−‖q−k‖²/2σ²) ∝ exp(q·k/σ²)`` for unit vectors (the constant cancels in the
normaliser). ω is drawn in ``prepare`` (untimed, seeded; ``feature_seed``). sin/cos features can make the
denominator ≤ 0: it is clamped at ``floor`` (default 1e-3) in every form alike.

What RFA approximates is softmax attention over *normalised* q and k at temperature σ², not the harness's
softmax(q·k/√d) on raw inputs, so rows carry no ``approx_err`` (``softmax_comparable=False``). The gated
variant (RFA-Gate) is not implemented here. Hyper-parameters: ``features`` (D, default 2·d),
``sigma`` (default 1.0), ``floor``, ``feature_seed`` and the skeleton's ``chunk``, ``eps``,
``compute_dtype``, ``reference_naive_max_pairs``. ``impl: triton`` (the kernelised methods' Triton scan,
methods/linear/common.py ``kernelized``): the same sin/cos features through the own Triton scan, whose
normaliser is clamped as here (``max(Σ φq·φk, floor) + eps``; the backward gives the sum no gradient where the
floor holds, as autograd of ``clamp_min``); causal self-attention with 2D <= 256 (the default D = 2d: head
dim <= 64), otherwise ``unsupported``. RFA's form has no gate or per-token decay here (RFA-Gate is not
implemented), so nothing is left that the scan cannot express.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import Capabilities, register_method
from .common import KERNELIZED_CAPS, KERNELIZED_OPTIONS, expand_heads, kernelized, param_float, param_int


def rfa_features(x, omega):
    xn = F.normalize(x.float(), dim=-1)
    proj = xn @ omega.T
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1) / math.sqrt(omega.shape[0])


@register_method("rfa", Capabilities(**KERNELIZED_CAPS, prefix_closed=True),
                 options=KERNELIZED_OPTIONS + ("features", "sigma", "floor", "feature_seed"))
def build_rfa(ctx):
    """RFA: sin/cos random features of l2-normalised q, k (different operator from softmax on raw q, k)."""
    case = ctx.case
    D = param_int(ctx, "features", 2 * case.head_dim, minimum=1, maximum=1 << 16)
    sigma = param_float(ctx, "sigma", 1.0, minimum=0.0, strict_min=True)
    floor = param_float(ctx, "floor", 1e-3, minimum=0.0)
    seed = param_int(ctx, "feature_seed", 0, minimum=0)

    def prepare(q, k, v, **_):
        gen = torch.Generator(device=q.device).manual_seed(case.seed * 7919 + seed)
        return {"omega": torch.randn(D, case.head_dim, generator=gen, device=q.device) / sigma}

    def features(q, k, v, q_pos=None, k_pos=None, omega=None):
        heads = q.shape[1]
        fq = rfa_features(q, omega)
        fk = rfa_features(expand_heads(k, heads), omega)
        return fq, fk, expand_heads(v, heads)

    return kernelized(ctx, features, softmax_comparable=False, prepare=prepare, floor=floor, feature_width=2 * D)
