"""Performer FAVOR+ (Choromanski et al., ICLR 2021, arXiv:2009.14794), methods-spec §12b.

Positive random features ``φ(x) = exp(ω·x̃ − ‖x̃‖²/2) / √m`` with ``x̃ = x · d^(-1/4)``, so that
``E[φ(q)·φ(k)] = exp(q·k/√d)``: an unbiased estimate of softmax attention's kernel (class A; ``approx_err``
is recorded). ω: ``m`` rows drawn in orthogonal blocks (QR of a Gaussian d×d block, rows rescaled by
χ_d-distributed norms) or i.i.d. Gaussian (``orthogonal: false``).

Random draws are not the method: they are made in ``prepare`` (untimed), seeded from the case seed plus
``feature_seed``. ``redraw`` is the policy: ``per_input`` (default: ``prepare`` draws for each input, as a
training loop that redraws per step would) or ``fixed`` (drawn once in the builder and reused for every
input, as in evaluation). ``per_head`` draws one matrix per head (default: one shared by all heads, as
performer-pytorch does).

Stabilisers: the query features subtract their row maximum (it cancels between numerator and denominator).
The key features are *not* shifted by a data-dependent maximum, unlike the official code's global key
max: that constant would make a causal output depend on future keys (through ε) and would differ between a
prefill and a decode step. Features are computed in fp32, whose range holds ``exp(ω·x̃ − ‖x̃‖²/2)`` for
inputs of ordinary scale.

Hyper-parameters: ``features`` (m, default round(d·ln d)), ``orthogonal``, ``redraw``, ``per_head``,
``feature_seed``, plus the skeleton's ``chunk``, ``eps``, ``compute_dtype``, ``reference_naive_max_pairs``.

``impl``: ``chunked`` (default, the PyTorch chunked form) or ``triton`` (the same features, then the own Triton
scan over them, forward and backward; causal self-attention, m <= 256: otherwise the case is ``unsupported``;
options ``chunk``, ``block_v``, ``seg_chunks``, ``num_warps``: methods/linear/common.py ``kernelized``).
"""
from __future__ import annotations

import math

import torch

from ..registry import Capabilities, register_method
from .common import KERNELIZED_CAPS, KERNELIZED_OPTIONS, expand_heads, kernelized, param_choice, param_int

REDRAW = ("per_input", "fixed")


def draw_omega(m: int, d: int, generator: torch.Generator, device, orthogonal: bool = True, heads: int = 0):
    """Random projections ``[m, d]`` (or ``[heads, m, d]``), fp32, from ``generator`` (seeded by the caller)."""
    if heads:
        return torch.stack([draw_omega(m, d, generator, device, orthogonal) for _ in range(heads)])
    if not orthogonal:
        return torch.randn(m, d, generator=generator, device=device)
    blocks = []
    for _ in range(-(-m // d)):
        gauss = torch.randn(d, d, generator=generator, device=device)
        ortho, upper = torch.linalg.qr(gauss)  # orthonormal columns
        # sign-correct by R's diagonal so Q is Haar-distributed (LAPACK's signs bias the directions)
        ortho = ortho * torch.sign(torch.diagonal(upper)).masked_fill(torch.diagonal(upper) == 0, 1.0)
        blocks.append(ortho.T)
    rows = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator, device=device).norm(dim=1, keepdim=True)
    return rows * norms


def favor_features(x: torch.Tensor, omega: torch.Tensor, is_query: bool) -> torch.Tensor:
    """``φ(x)`` [B, H, L, m] in fp32; queries shifted by their row max (cancels in the ratio)."""
    d = x.shape[-1]
    xs = x.float() * d ** -0.25
    if omega.dim() == 2:
        proj = xs @ omega.T
    else:
        proj = torch.einsum("bhld,hmd->bhlm", xs, omega)
    logits = proj - 0.5 * (xs * xs).sum(-1, keepdim=True)
    if is_query:
        logits = logits - logits.amax(-1, keepdim=True).detach()
    return torch.exp(logits) / math.sqrt(omega.shape[-2])


@register_method("performer", Capabilities(**KERNELIZED_CAPS, prefix_closed=True),
                 options=KERNELIZED_OPTIONS + ("features", "orthogonal", "per_head", "redraw", "feature_seed"))
def build_performer(ctx):
    """Performer FAVOR+: positive orthogonal random features drawn untimed in prepare (redraw policy)."""
    case = ctx.case
    d = case.head_dim
    m = param_int(ctx, "features", max(1, round(d * math.log(d))), minimum=1, maximum=1 << 16)
    orthogonal = ctx.param("orthogonal", True)
    per_head = ctx.param("per_head", False)
    for name, value in (("orthogonal", orthogonal), ("per_head", per_head)):
        if not isinstance(value, bool):
            raise ValueError(f"method_options.{case.method}.{name}: must be true or false, got {value!r}")
    redraw = param_choice(ctx, "redraw", "per_input", REDRAW)
    seed = param_int(ctx, "feature_seed", 0, minimum=0)
    heads = case.heads_q if per_head else 0

    def draw():
        gen = torch.Generator(device=ctx.device).manual_seed(case.seed * 7919 + seed)
        return draw_omega(m, d, gen, ctx.device, orthogonal, heads)

    fixed = draw() if redraw == "fixed" else None

    def prepare(q, k, v, **_):
        return {"omega": fixed if fixed is not None else draw()}

    def features(q, k, v, q_pos=None, k_pos=None, omega=None):
        heads_q = q.shape[1]
        return (favor_features(q, omega, True), favor_features(expand_heads(k, heads_q), omega, False),
                expand_heads(v, heads_q))

    return kernelized(ctx, features, softmax_comparable=True, prepare=prepare, feature_width=m)
