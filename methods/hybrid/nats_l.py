"""NAtS-L, Neural Attention Search Linear (Deng et al., arXiv:2602.03681), §7, layer form: a token/chunk-level
hybrid of a Gated DeltaNet (own, ``methods.linear.gated_delta``) and causal softmax attention, routed per chunk.

Projections ``q, k, v = SiLU(causal_dwconv_4(x W))``, split into H heads of D (the paper splits the same
tensors into 6 GDN heads of 128/256 and 12 softmax heads of 64/128; here both branches use the case's H × D —
a stated simplification). Per chunk of ``block`` tokens a router scores ``W_route · mean(x_chunk)`` → (softmax,
linear) per head; the decision is the argmax of the fp32 scores, with a straight-through gradient
(forward one-hot, backward softmax).

- Softmax branch: RMSNorm'd q, k; query t attends the keys ``j ≤ t`` of its own chunk and of every earlier
  chunk routed to softmax. Two forms (option ``softmax``):

  * ``dense`` (:func:`softmax_branch`): the mask applied multiplicatively (``w ∝ M ⊙ exp(logit − max)``) so that
    the router gets a gradient through it; per (query, key) pair, O(L²) time and memory — refused above
    ``max_len`` (default 8192).
  * ``flex`` (:func:`softmax_branch_flex`): compiled FlexAttention with a BlockMask built per call from the
    routing (per batch and head, blocks of :data:`FLEX_BLOCK` = 128 tokens; a key block is listed for a query
    block when it holds a key some query sees, full when every query sees every key, else partial and the
    mask_mod decides), no length cap. The router's straight-through gradient is carried exactly: see the
    function's docstring (a score_mod bias whose value is 0, plus, in backward only, a pass over the
    complementary blocks). Forward work ∝ the listed blocks (about the routed fraction of the causal
    blocks); with gradients it is O(L²) again (the dense form's router gradient reads every causal pair),
    but in FlexAttention's tiles, never an [L, L] matrix.
  * ``auto`` (default): ``dense`` up to ``max_len``, ``flex`` above it on CUDA (:func:`softmax_form`: the
    dense form was faster where both ran on the H200, 2K; compiled FlexAttention has no backward on the CPU
    in torch 2.11-2.13, so off CUDA always ``dense``).
- GDN branch: ``g = −exp(A_log)·softplus(x W_a + dt_bias)``, ``β = σ(x W_b)``; chunk-start states come from the
  recurrence with ``β·m_lin`` (a chunk routed to softmax only decays the carried state); inside a chunk every
  query runs the delta rule from its chunk-start state with the true β.
- Output: ``(w_sm·RMSNorm(o_sm) + w_lin·RMSNorm(o_lin)) ⊙ SiLU(x W_g)``, ``w = softmax₂(q W_w)`` per head, then W_o.

Forms: fast = the chunked WY pieces (states by the chunk loop with β·m_lin, outputs for all chunks at once
with the true β) + the softmax branch in the chosen form; reference = the token loop with the carry/run
split written out, up to ``reference_loop_max_len`` (default 1024; above, the fast path's code in fp32),
and the dense multiplicative softmax branch, itself capped at ``max_len`` (a reference called whole above it
raises, naming ``correctness.ref_full_pairs``). The reference takes ``rows=`` (the gate's sampled tokens
at long lengths): the softmax branch at those rows only, key-gathered, O(rows × L) - never [L, L].
fp32 inside. Causal only; a different operator (class N). Hyper-parameters: ``block`` (routing chunk,
default 64), ``softmax`` (auto | dense | flex), ``max_len`` (dense forms), ``reference_loop_max_len``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..fitting import fits_length, pow2_divisor
from ..linear import gated_delta
from ..linear.common import mask_mode, param_int
from ..sparse.common import block_visible, compiled_primitive, pattern_reference, touched_first
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


# ---- the softmax branch as block-sparse FlexAttention --------------------------------------------------------
FLEX_BLOCK = 128
"""BlockMask block size of the flex form. 64 (the routing chunk) would list exactly the routed chunks, but
torch's default kernel configs on sm90 (H100/H200) tile by 128 (forward bf16/fp16 d=64: BLOCK_M = BLOCK_N =
128; backward d ≤ 128: (64, 128, 128, 64)) and refuse or skip a block size they do not divide (torch 2.13
``_inductor/kernel/flex/flex_attention.py``); 128 works on every version, a kv block with one routed chunk of
two is partial (the mask_mod decides inside it)."""

FAULTS = ("drop_same", "drop_routed", "no_complement")
"""Deliberately broken variants of :func:`softmax_branch_flex` (negative controls): the same-chunk (diagonal)
blocks left out of the BlockMask, the routed earlier blocks left out, the complementary pass (the router's
gradient on chunks routed away from softmax) skipped."""


def flex_scored(q, k, v, block_mask, score_mod):
    """FlexAttention (call it compiled) with a score_mod: ``(out, lse)``, lse in natural log (-inf on rows
    that see no key)."""
    from torch.nn.attention import flex_attention as fa

    if hasattr(fa, "AuxRequest"):
        out, aux = fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                     return_aux=fa.AuxRequest(lse=True))
        return out, aux.lse
    return fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True)


def block_attend_scored(q, k, v, block_mask, score_mod):
    """The contract of :func:`flex_scored`, written out (CPU tests; differentiable by autograd): a key is
    visible in a *full* block listed for its query block whatever the mask_mod says, in a listed *partial*
    block where the mask_mod says so, nowhere else (so a wrong block list is seen); scores ``q·k/√d`` pass
    through ``score_mod`` (indices broadcast [B, H, Lq, Lk]) before the masked softmax."""
    visible, (b, h, qi, ki) = block_visible(q, k, block_mask)
    scores = score_mod(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), b, h, qi, ki)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.matmul(torch.exp(scores - safe[..., None]), v)
    return out, lse


ATTEND = flex_scored  # the CPU tests swap in block_attend_scored (the same contract, written out)


def _attend(ctx):
    """The primitive of the flex form, compiled from a fresh dynamo cache (CUDA only, unless swapped)."""
    return compiled_primitive(ctx, ATTEND, flex_scored, "method_options.nats_l.softmax=flex runs on CUDA "
                              "(compiled FlexAttention has no backward on the CPU); softmax=dense or auto run here")


def softmax_block_flags(routed, block: int, length: int, flex_block: int = FLEX_BLOCK, fault=None):
    """Block flags of the two FlexAttention passes, ``(main_partial, main_full, comp_partial, comp_full)``, each
    ``[B, H, nb, nb]`` (``nb = ceil(L / flex_block)``), from ``routed [B, H, L / block]`` (chunk to softmax).

    main: query chunk i sees key chunk j iff j == i (token-causal) or (j < i and routed[j]).
    comp (the complement, for the router's gradient): j < i and not routed[j].
    ``flex_block`` and ``block`` must divide one another. A block holding positions past the end is never full."""
    batch, heads, _ = routed.shape
    nb = -(-length // flex_block)
    device = routed.device
    tok = routed.repeat_interleave(block, dim=-1).to(torch.int32)
    tok = F.pad(tok, (0, nb * flex_block - length))
    routed_count = tok.view(batch, heads, nb, flex_block).sum(-1)[:, :, None, :]  # per key block
    valid = (length - torch.arange(nb, device=device) * flex_block).clamp(max=flex_block)
    whole = (valid == flex_block)[None, None, None, :]
    unrouted_count = valid - routed_count
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    below, diagonal = (j < i)[None, None], (j == i)[None, None]
    share = ((j * flex_block) // block == (i * flex_block) // block)[None, None]  # one chunk (block ≥ flex_block)
    main_full = below & whole & (share | (routed_count == valid))
    main_any = diagonal | (below & (share | (routed_count > 0)))
    comp_full = below & whole & ~share & (unrouted_count == valid)
    comp_any = below & ~share & (unrouted_count > 0)
    if flex_block > block:  # a diagonal block holds earlier chunks: listed if one is unrouted (and later queries)
        per = flex_block // block
        n = routed.shape[-1]
        away = F.pad(~routed, (0, nb * per - n)).view(batch, heads, nb, per)
        last = (n - torch.arange(nb, device=device) * per).clamp(max=per) - 1  # the block's last chunk
        own = (away & (torch.arange(per, device=device) < last[:, None])).any(-1)  # [B, H, nb]
        comp_any = comp_any | (diagonal & own[..., :, None])
    main_any, main_full = main_any.expand(batch, heads, nb, nb), main_full.expand(batch, heads, nb, nb)
    if fault == "drop_same":
        main_any, main_full = main_any & ~diagonal, main_full & ~diagonal
    elif fault == "drop_routed":
        main_any, main_full = main_any & ~below, main_full & ~below
    return main_any & ~main_full, main_full, comp_any & ~comp_full, comp_full


def _block_mask(partial, full, mask_mod, length: int, flex_block: int):
    from torch.nn.attention.flex_attention import BlockMask

    def listed(flags):  # every key block in the index width (torch 2.11's transpose reads it as the count)
        return flags.sum(dim=-1, dtype=torch.int32), touched_first(flags)  # the stable argsort's order, no sort

    counts, order = listed(partial)
    full_counts, full_order = listed(full)
    return BlockMask.from_kv_blocks(counts, order, full_counts, full_order, BLOCK_SIZE=flex_block,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


def softmax_branch_flex(q, k, v, m_sm, block: int, attend=None, flex_block: int | None = None, fault=None):
    """:func:`softmax_branch` through (compiled) FlexAttention with BlockMasks built from the routing: the same
    values and the same gradients for q, k, v and ``m_sm`` (hence the router).

    Router gradient. The dense form's mask weight ``M[t, s] = m_sm[chunk(s)]`` (earlier chunks) gives
    ``∂L/∂m_j = Σ_t Σ_{s ∈ j} e^{ℓ_ts} (dO_t·v_s − dO_t·o_t) / Z_t`` over every query t of a later chunk,
    routed chunk (m = 1) or not (m = 0). A mask_mod carries no gradient, so:

    - routed chunks: the main pass adds ``bias[s] = m_sm − sg(m_sm)`` (value 0) to the scores of earlier-chunk
      keys in a score_mod on a captured tensor; ∂L/∂bias_s = P_ts (dP_ts − δ_t), which at M = 1 is exactly
      ∂L/∂M_ts (``w ∝ M e^ℓ`` and ``ℓ + log M`` have the same derivative there).
    - chunks routed away (m = 0): their keys are outside the main pass, so a second pass over the complementary
      blocks (earlier chunks with m = 0; q, k, v detached, the same bias) gives ``(o_c, lse_c)``, and the output
      gets ``r · ((o_c − sg o_c) + (sg o_c − sg o) · (lse_c − sg lse_c))`` with ``r = sg(exp(lse_c − lse))``:
      0 in value; its derivative in bias_j is
      ``r Σ_{s∈j} P^c_ts (v_s − o_t) = Σ_{s∈j} e^{ℓ_ts} (v_s − o_t)/Z_t``, the dense form's. It needs
      FlexAttention's gradients of a captured score_mod tensor (indexed once: torch refuses two indexings of one
      grad tensor) and of the lse (both in torch 2.13's HOP; not run on a GPU from here). It runs only when
      ``m_sm`` requires grad under grad mode, so a forward (no_grad) costs the main pass alone; with gradients
      the two passes together visit every causal block (the dense form's router gradient reads every pair).

    ``attend(q, k, v, block_mask, score_mod) -> (out, lse)``: :data:`ATTEND` by default. ``fault``: one of
    :data:`FAULTS` (negative controls)."""
    attend = ATTEND if attend is None else attend
    flex_block = FLEX_BLOCK if flex_block is None else flex_block
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    if flex_block % block and block % flex_block:
        raise ValueError(f"the routing chunk {block} and the flex block {flex_block} must divide one another")
    length = q.shape[2]
    q, k = rms_norm(q), rms_norm(k)
    routed = m_sm.detach() > 0.5
    bias = (m_sm - m_sm.detach()).repeat_interleave(block, dim=-1)  # [B, H, L], value 0
    main_p, main_f, comp_p, comp_f = softmax_block_flags(routed, block, length, flex_block, fault)

    def main_mask(b, h, q_idx, kv_idx):
        q_chunk, kv_chunk = q_idx // block, kv_idx // block
        return ((q_chunk == kv_chunk) & (kv_idx <= q_idx)) | ((kv_chunk < q_chunk) & routed[b, h, kv_chunk])

    def main_score(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, kv_idx] * (kv_idx // block < q_idx // block)

    out, lse = attend(q, k, v, _block_mask(main_p, main_f, main_mask, length, flex_block), main_score)
    if fault == "no_complement" or not (torch.is_grad_enabled() and m_sm.requires_grad):
        return out

    def comp_mask(b, h, q_idx, kv_idx):
        kv_chunk = kv_idx // block
        return (kv_chunk < q_idx // block) & ~routed[b, h, kv_chunk]

    def comp_score(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, kv_idx]

    out_c, lse_c = attend(q.detach(), k.detach(), v.detach(), _block_mask(comp_p, comp_f, comp_mask, length,
                                                                           flex_block), comp_score)
    seen = torch.isfinite(lse_c)
    lse_c = torch.where(seen, lse_c, torch.zeros_like(lse_c))
    ratio = torch.where(seen, torch.exp(lse_c - lse.detach()), torch.zeros_like(lse_c)).detach()
    held = out_c.detach()
    tie = (out_c - held) + (held - out.detach()) * (lse_c - lse_c.detach())[..., None]
    return out + ratio[..., None] * tie


def softmax_rows(q, k, v, m_sm, block: int, rows):
    """:func:`softmax_branch` at the query rows ``rows`` only (``[B, H, R, D]``; forward, for the gate's sampled
    rows at long lengths): the same mask as booleans (the dense form's multiplicative weights are 0 or 1 in
    value), each row's visible keys gathered, O(R × L) - no [L, L] matrix."""
    q, k = rms_norm(q), rms_norm(k)
    length = q.shape[2]
    key_chunk = torch.arange(length, device=q.device) // block
    routed = m_sm > 0.5

    def allowed(idx):
        q_chunk = (idx // block)[:, None]
        same = (key_chunk[None, :] == q_chunk) & (torch.arange(length, device=q.device)[None, :] <= idx[:, None])
        earlier = (key_chunk[None, :] < q_chunk)[None, None] & routed[:, :, None, key_chunk]
        return same[None, None] | earlier

    return pattern_reference(q, k, v, allowed, rows=rows)


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


def nats_layer(p, heads: int, block: int, gdn, conv, softmax=softmax_branch):
    """The layer ``x [B, L, width] -> y``; ``softmax(q, k, v, m_sm, block)`` is the softmax branch's form. With
    ``rows`` (the reference's long-case form): ``y`` at those tokens only, the softmax branch by
    :func:`softmax_rows`."""
    def forward(x, rows=None):
        dtype = x.dtype
        x = x.float()
        q, k, v = (F.silu(conv(x @ p[f"w_{n}"], p[f"conv_{n}"], True)) for n in ("q", "k", "v"))
        q, k, v = (split_heads(t, heads) for t in (q, k, v))
        m_sm, m_lin = route(x, p, heads, block)
        if rows is None:
            o_sm = softmax(q, k, v, m_sm, block)
        else:
            rows = rows.to(x.device).long()
            o_sm = softmax_rows(q, k, v, m_sm, block, rows)
        g = (-torch.exp(p["a_log"]) * F.softplus(x @ p["w_a"] + p["dt_bias"])).transpose(1, 2)
        beta = torch.sigmoid(x @ p["w_b"]).transpose(1, 2)
        o_lin = gdn(q, k, v, g, beta, m_lin, block)
        if rows is not None:
            q, o_lin, x = q[:, :, rows], o_lin[:, :, rows], x[:, rows]
        mix = torch.softmax(torch.einsum("bhld,hde->bhle", q, p["w_w"]), -1)
        o = mix[..., :1] * rms_norm(o_sm) + mix[..., 1:] * rms_norm(o_lin)
        y = (merge_heads(o) * F.silu(x @ p["w_g"])) @ p["w_o"]
        return y.to(dtype)

    return forward


BLOCK = 64  # the default routing chunk
SOFTMAX_FORMS = ("auto", "dense", "flex")


@fits_length("nats_l")
def fit_nats_l(seq_q: int, seq_kv: int, causal: bool, given: dict) -> dict:
    """A default chunk that does not divide the length: the largest power of two dividing it with at least 4
    chunks (at most the default)."""
    if "block" in given or seq_q % BLOCK == 0:
        return {}
    return {"block": pow2_divisor(seq_q, min(BLOCK, seq_q / 4))}


def softmax_form(form: str, device_type: str, length: int, max_len: int) -> str:
    """The softmax branch's form: ``auto`` is ``dense`` up to ``max_len`` tokens (on the H200 at 2K: fwd 8.87 ms
    against the FlexAttention form's 18.2 ms, fwd_bwd 34.4 against 71.6: results/h200-linear and
    results/h200-linear-nats-flex) and ``flex`` above it on CUDA (the dense form's O(L²) cap); off CUDA always
    ``dense`` (compiled FlexAttention has no CPU backward). ``dense`` and ``flex`` are taken as given."""
    if form != "auto":
        return form
    return "flex" if device_type == "cuda" and length > max_len else "dense"


@register_method("nats_l", Capabilities(family="hybrid", exact=False, form="layer", masks={"causal"},
                                         causal_only=True, backward=True, trainable=True),
                 options=("block", "softmax", "max_len", "reference_loop_max_len"))
def build_nats_l(ctx):
    """NAtS-L layer: per-chunk routing between Gated DeltaNet and softmax attention (straight-through router)."""
    mask_mode(ctx)
    case = ctx.case
    if case.seq_q != case.seq_kv:
        raise Unsupported("nats_l is a self-attention layer (seq_q == seq_kv)")
    block = param_int(ctx, "block", BLOCK, minimum=1)
    max_len = param_int(ctx, "max_len", 8192, minimum=1)
    loop_max = param_int(ctx, "reference_loop_max_len", 1024)
    form = ctx.param("softmax", "auto")
    if form not in SOFTMAX_FORMS:
        raise ValueError(f"method_options.nats_l.softmax: must be one of {', '.join(SOFTMAX_FORMS)}, got {form!r}")
    length = case.seq_q
    form = softmax_form(form, ctx.device.type, length, max_len)
    if length % block:
        raise Unsupported(f"sequence length {length} is not a multiple of method_options.nats_l.block={block}")
    if form == "dense" and length > max_len:
        raise Unsupported(f"the routed softmax branch is dense here (O(L²)): length {length} is over "
                          f"method_options.nats_l.max_len={max_len} (method_options.nats_l.softmax=flex has no cap)")
    if form == "flex" and FLEX_BLOCK % block and block % FLEX_BLOCK:
        raise Unsupported(f"method_options.nats_l.softmax=flex: method_options.nats_l.block={block} and the "
                          f"FlexAttention block {FLEX_BLOCK} must divide one another")
    attend = _attend(ctx) if form == "flex" else None
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
    if form == "flex":
        def softmax_fast(q, k, v, m_sm, block_):
            return softmax_branch_flex(q, k, v, m_sm, block_, attend)
    else:
        softmax_fast = softmax_branch
    fast = nats_layer(p, heads, block, gdn_branch_chunked, dwconv, softmax_fast)

    def gdn_ref(q, k, v, g, beta, m_lin, block_):
        if q.shape[2] <= loop_max:
            return gdn_branch_loop(q, k, v, g, beta, m_lin, block_)
        return gdn_branch_chunked(q, k, v, g, beta, m_lin, block_)

    def softmax_ref(q, k, v, m_sm, block_):
        if q.shape[2] > max_len:
            raise ValueError(f"nats_l reference: the dense softmax branch is capped at method_options.nats_l."
                             f"max_len={max_len} (length {q.shape[2]}); gate long cases on sampled rows "
                             f"(correctness.ref_full_pairs <= max_len², the reference takes rows=)")
        return softmax_branch(q, k, v, m_sm, block_)

    reference = nats_layer(p, heads, block, gdn_ref, dwconv_reference, softmax_ref)
    flops = case.batch * length * (2.0 * width * width * 5 + 2.0 * width * 2 * heads
                                   + 2.0 * length * width  # routed softmax: half the causal pairs on average
                                   + 4.0 * heads * (block * dim + dim * dim))
    return Prepared(fn=fast, reference=reference, parameters=make.tensors, flops=flops, softmax_comparable=False)
