"""NAtS-L, Neural Attention Search Linear (Deng et al., arXiv:2602.03681), §7, layer form: a token/chunk-level
hybrid of a Gated DeltaNet (own, ``methods.linear.gated_delta``) and causal softmax attention, routed per chunk.

Projections ``q, k, v = SiLU(causal_dwconv_4(x W))``, split into H heads of D (the paper splits the same
tensors into 6 GDN heads of 128/256 and 12 softmax heads of 64/128; here both branches use the case's H × D —
a stated simplification). Per chunk of ``block`` tokens a router scores ``W_route · mean(x_chunk)`` → (softmax,
linear) per head; the decision is the argmax of the fp32 scores, with a straight-through gradient
(forward one-hot, backward softmax).

- Softmax branch: RMSNorm'd q, k; query t attends the keys ``j ≤ t`` of its own chunk and of every earlier
  chunk routed to softmax. The mask is applied multiplicatively (``w ∝ M ⊙ exp(logit − max)``) so that the
  router gets a gradient through it. Dense per (query, key) pair: O(L²) — short and mid lengths
  (``max_len``, default 8192).
- GDN branch: ``g = −exp(A_log)·softplus(x W_a + dt_bias)``, ``β = σ(x W_b)``; chunk-start states come from the
  recurrence with ``β·m_lin`` (a chunk routed to softmax only decays the carried state); inside a chunk every
  query runs the delta rule from its chunk-start state with the true β.
- Output: ``(w_sm·RMSNorm(o_sm) + w_lin·RMSNorm(o_lin)) ⊙ SiLU(x W_g)``, ``w = softmax₂(q W_w)`` per head, then W_o.

Forms: fast = the chunked WY pieces (states by the chunk loop with β·m_lin, outputs for all chunks at once
with the true β) + the dense masked softmax; reference = the token loop with the carry/run split written
out, up to ``reference_loop_max_len`` (default 1024; above, the fast path's code in fp32). fp32 inside.
Causal only; a different operator (class N). Hyper-parameters: ``block`` (routing chunk, default 64),
``max_len``, ``reference_loop_max_len``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..fitting import fits_length, pow2_divisor
from ..linear import gated_delta
from ..linear.common import mask_mode, param_int
from ..registry import Capabilities, Unsupported, register_method
from .layers import ParamMaker, dwconv, dwconv_reference, merge_heads, rms_norm, split_heads


def route(x, p, heads: int, block: int):
    """Straight-through one-hot routing per chunk: (m_sm, m_lin), each [B, H, n_chunks]."""
    batch, length, width = x.shape
    n = length // block
    pooled = x.view(batch, n, block, width).mean(2)
    scores = (pooled @ p["w_route"]).view(batch, n, heads, 2).float()
    soft = torch.softmax(scores, -1)
    hard = F.one_hot(scores.argmax(-1), 2).to(soft.dtype)
    m = hard + soft - soft.detach()
    return m[..., 0].transpose(1, 2), m[..., 1].transpose(1, 2)


def softmax_branch(q, k, v, m_sm, block: int):
    """Causal attention over own-chunk keys and keys of earlier softmax-routed chunks (multiplicative mask)."""
    length = q.shape[2]
    chunk_of = torch.arange(length, device=q.device) // block
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    same = chunk_of[:, None] == chunk_of[None, :]
    earlier = (chunk_of[None, :] < chunk_of[:, None]).float()
    keep = same.float() + earlier * m_sm[:, :, None, chunk_of]  # [B, H, L, L]
    keep = keep * causal
    q, k = rms_norm(q), rms_norm(k)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~causal, float("-inf"))
    w = torch.exp(logits - logits.amax(-1, keepdim=True).detach()) * keep
    return (w @ v) / w.sum(-1, keepdim=True)


def gdn_branch_chunked(q, k, v, g, beta, m_lin, block: int):
    kw = dict(gated=True, delta=True, normalize=True)
    q, k, v, g, beta, lead, length = gated_delta._prepare(q, k, v, g, beta, chunk=block, **kw)
    n = q.shape[2] // block
    beta_carry = beta * m_lin.repeat_interleave(block, dim=-1)
    _, _, Uc, Wc, kd, last = gated_delta.chunk_pieces(q, k, v, g, beta_carry, delta=True, chunk=block)
    S0 = q.new_zeros(q.shape[0], q.shape[1], k.shape[-1], v.shape[-1])
    states, _ = gated_delta.chunk_states(Uc, Wc, kd, last, S0)
    qg, attn, U, W, _, _ = gated_delta.chunk_pieces(q, k, v, g, beta, delta=True, chunk=block)
    out = gated_delta.chunk_outputs(qg, attn, U, W, states).reshape(*q.shape[:3], v.shape[-1])
    return (q.shape[-1] ** -0.5) * out[:, :, lead:length]


def gdn_branch_loop(q, k, v, g, beta, m_lin, block: int):
    """The token loop: a carried state (β·m_lin) and, inside each chunk, a running state from its start."""
    scale = q.shape[-1] ** -0.5
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    batch, heads, length, dk = k.shape
    carry = q.new_zeros(batch, heads, dk, v.shape[-1])
    outs = []
    for t in range(length):
        if t % block == 0:
            run = carry
        kt, vt = k[:, :, t], v[:, :, t]
        alpha = torch.exp(g[:, :, t])[..., None, None]
        for which in ("run", "carry"):
            S = run if which == "run" else carry
            b = beta[:, :, t] if which == "run" else beta[:, :, t] * m_lin[:, :, t // block]
            b = b[..., None, None]
            S = alpha * S
            S = S - b * kt[..., :, None] * (kt[..., None, :] @ S) + b * kt[..., :, None] * vt[..., None, :]
            if which == "run":
                run = S
            else:
                carry = S
        outs.append(scale * (q[:, :, t, None, :] @ run)[:, :, 0])
    return torch.stack(outs, dim=2)


def nats_layer(p, heads: int, block: int, gdn, conv):
    def forward(x):
        dtype = x.dtype
        x = x.float()
        q, k, v = (F.silu(conv(x @ p[f"w_{n}"], p[f"conv_{n}"], True)) for n in ("q", "k", "v"))
        q, k, v = (split_heads(t, heads) for t in (q, k, v))
        m_sm, m_lin = route(x, p, heads, block)
        o_sm = softmax_branch(q, k, v, m_sm, block)
        g = (-torch.exp(p["a_log"]) * F.softplus(x @ p["w_a"] + p["dt_bias"])).transpose(1, 2)
        beta = torch.sigmoid(x @ p["w_b"]).transpose(1, 2)
        o_lin = gdn(q, k, v, g, beta, m_lin, block)
        mix = torch.softmax(torch.einsum("bhld,hde->bhle", q, p["w_w"]), -1)
        o = mix[..., :1] * rms_norm(o_sm) + mix[..., 1:] * rms_norm(o_lin)
        y = (merge_heads(o) * F.silu(x @ p["w_g"])) @ p["w_o"]
        return y.to(dtype)

    return forward


BLOCK = 64  # the default routing chunk


@fits_length("nats_l")
def fit_nats_l(seq_q: int, seq_kv: int, causal: bool, given: dict) -> dict:
    """A default chunk that does not divide the length: the largest power of two dividing it with at least 4
    chunks (at most the default)."""
    if "block" in given or seq_q % BLOCK == 0:
        return {}
    return {"block": pow2_divisor(seq_q, min(BLOCK, seq_q / 4))}


@register_method("nats_l", Capabilities(family="hybrid", exact=False, form="layer", masks={"causal"},
                                         causal_only=True, backward=True, trainable=True),
                 options=("block", "max_len", "reference_loop_max_len"))
def build_nats_l(ctx):
    """NAtS-L layer: per-chunk routing between Gated DeltaNet and softmax attention (straight-through router)."""
    mask_mode(ctx)
    case = ctx.case
    if case.seq_q != case.seq_kv:
        raise Unsupported("nats_l is a self-attention layer (seq_q == seq_kv)")
    block = param_int(ctx, "block", BLOCK, minimum=1)
    max_len = param_int(ctx, "max_len", 8192, minimum=1)
    loop_max = param_int(ctx, "reference_loop_max_len", 1024)
    length = case.seq_q
    if length % block:
        raise Unsupported(f"sequence length {length} is not a multiple of method_options.nats_l.block={block}")
    if length > max_len:
        raise Unsupported(f"the routed softmax branch is dense here (O(L²)): length {length} is over "
                          f"method_options.nats_l.max_len={max_len}")
    heads, dim = case.heads_q, case.head_dim
    width = heads * dim
    make = ParamMaker(case.seed, ctx.device)
    std = width ** -0.5
    p = {f"w_{n}": make.randn(width, width, std=std) for n in ("q", "k", "v")}
    p.update({f"conv_{n}": make.randn(width, 4, std=0.5) for n in ("q", "k", "v")})
    p.update(w_route=make.randn(width, 2 * heads, std=std), w_w=make.randn(heads, dim, 2, std=dim ** -0.5),
             w_a=make.randn(width, heads, std=std), w_b=make.randn(width, heads, std=std),
             dt_bias=make.uniform(heads, low=-4.0, high=-1.0), a_log=make.uniform(heads, low=0.0, high=1.0),
             w_g=make.randn(width, width, std=std), w_o=make.randn(width, width, std=std))
    fast = nats_layer(p, heads, block, gdn_branch_chunked, dwconv)

    def gdn_ref(q, k, v, g, beta, m_lin, block_):
        if q.shape[2] <= loop_max:
            return gdn_branch_loop(q, k, v, g, beta, m_lin, block_)
        return gdn_branch_chunked(q, k, v, g, beta, m_lin, block_)

    reference = nats_layer(p, heads, block, gdn_ref, dwconv_reference)
    flops = case.batch * length * (2.0 * width * width * 5 + 2.0 * width * 2 * heads
                                   + 2.0 * length * width  # routed softmax: half the causal pairs on average
                                   + 4.0 * heads * (block * dim + dim * dim))
    return Prepared(fn=fast, reference=reference, parameters=make.tensors, flops=flops, softmax_comparable=False)
