"""Superlinear multi-step attention, N = 2: span search, then span attention (Huang, arXiv:2601.18401;
methods-spec §1). Causal only (the paper defines no other form).

For the query at position t (T = t + 1 visible tokens), one head:

1. *candidate anchors*: stripes ``i = s+1, s+2, ...`` while ``f(i) = floor(i^(1/p)) <= T``; anchor
   ``a_i = t - f(i) + 1`` (p = 1/2: distances 0, 3, 8, 15, ... - about sqrt(T) anchors);
2. *search*: ``u_i = q1_t . k_{a_i}`` (raw dot product, as the reference code) with a separate search query
   ``q1`` (an extra input); keep the ``num_spans`` best anchors;
3. *spans*: ``[max(a - ceil(b_back T^sigma), 0), min(a + ceil(b_fwd T^sigma), t, sw_start - 1)]`` with the
   local window ``[sw_start, t]``, ``sw_start = t - W + 1``, ``W = floor((s+1)^(1/p)) - 1`` (no window when 0);
4. *span attention*: ``O_j = softmax(tau q_t K_S) V_S`` over ``S = span_j U window``, one softmax per span;
5. *combine*: ``O_t = sum_j g_j O_j``, ``g = softmax(u of the selected anchors)`` (invalid anchors weigh 0;
   all invalid: 1 / num_spans). Gradients reach q, k, v through the span attentions and q1, k through ``g``;
   the top-k selection itself is not differentiated.

The search (the ``routing`` phase) is :func:`search`, computed in fp32 from diagonal bands of ``q1 . k``
stripe by stripe (no gather; O(L^1.5 d) multiply-adds, memory-bound) with a running top-k, in the reference
always and in the fast path by default (``search: triton``, below, gives the fast path the same anchors from
one kernel: the gate still compares the same routing). Fast path: one compiled FlexAttention call per span index j with a ``mask_mod`` reading the
per-query span bounds and a ``BlockMask`` built per call from the bounds (``BlockMask.from_kv_blocks``:
per query block, the union of its queries' spans and windows). Reference: the per-span boolean patterns
written out, masked softmax, the gated sum. The ``superlinear`` package (Triton, CUDA only) is not used here: it
computes the same operator with the same parameters and defaults (num_spans 2-3 and search_power < 1 only) and
is registered beside this method as ``superlinear_pkg`` (superlinear_pkg.py: the finding and the mapping).

Options: ``num_spans`` (3), ``sw_index`` (s, 0), ``search_power`` (p, 0.5, in (0, 1]), ``backward_factor``
(2.0), ``forward_factor`` (0.0), ``span_power`` (sigma, 0.5), ``search`` (``torch``, the default, or ``triton``):
how the fast path and the ``routing`` phase search. ``torch`` is :func:`search` below; ``triton`` is one own
kernel (superlinear_search_triton.py: per head and block of queries, q1 loaded once, the stripes walked with a
running top-k in registers; the same anchors, ties included), ``num_spans`` <= 8, on CUDA or with
``TRITON_INTERPRET=1`` (elsewhere the case is ``unsupported`` naming the field: no silent fallback). The
reference (the gate) always routes with :func:`search`. ``superlinear_pkg`` does not take ``search`` (it has
the package's own search kernel): the registry refuses the key there, naming the field.
"""
from __future__ import annotations

import math

import torch

from ..contract import Extra, Prepared
from ..registry import Capabilities, Unsupported, register_method
from .common import (Options, dynamic_block_mask, flex_path, masked_attention, masked_attention_rows,
                     ranges_to_blocks, row_chunks)

STRIPE_GROUP = 16  # stripes scored before each running top-k


def stripe_distances(length: int, search_power: float, sw_index: int) -> list[int]:
    """Anchor distances ``f(i) - 1`` of every stripe ``i > sw_index`` with ``f(i) <= length``."""
    out, i = [], sw_index + 1
    while True:
        f = math.floor(i ** (1.0 / search_power) + 1e-9)
        if f > length:
            return out
        if not out or f - 1 != out[-1]:
            out.append(f - 1)
        i += 1


def window_size(search_power: float, sw_index: int) -> int:
    return max(0, math.floor((sw_index + 1) ** (1.0 / search_power) + 1e-9) - 1)


def search(q1, k, distances: list[int], num_spans: int):
    """Top ``num_spans`` anchors per query from fp32 raw dot products: ``(anchors [B, H, L, n] long, -1 when
    invalid)``, best first. Stripe by stripe over diagonal bands (no gather), running top-k every group.

    Order: higher score first; on equal scores the smaller distance (the later anchor) first. The running top-k
    is a *stable* descending sort of ``cat([best so far, group])`` (earlier stripes come first in it, and among
    the best so far in this same order), cut to ``num_spans``: ``torch.topk`` orders ties arbitrarily (on the
    CPU it gave indices 1, 6, 4 of ``[1, 2, 2, 0, 2, -inf, 2]``), and ``search: triton``
    (superlinear_search_triton.py) must give the same anchors on ties."""
    batch, heads, length, _ = q1.shape
    q1f, kf = q1.detach().float(), k.detach().float()
    t = torch.arange(length, device=q1.device)
    best_score = torch.full((batch, heads, length, num_spans), float("-inf"), device=q1.device)
    best_anchor = torch.full((batch, heads, length, num_spans), -1, dtype=torch.long, device=q1.device)
    for g0 in range(0, len(distances), STRIPE_GROUP):
        group = distances[g0:g0 + STRIPE_GROUP]
        scores = torch.full((batch, heads, length, len(group)), float("-inf"), device=q1.device)
        anchors = torch.full((length, len(group)), -1, dtype=torch.long, device=q1.device)
        for g, d in enumerate(group):
            scores[:, :, d:, g] = (q1f[:, :, d:] * kf[:, :, :length - d]).sum(dim=-1)
            anchors[d:, g] = t[d:] - d
        all_scores = torch.cat([best_score, scores], dim=-1)
        all_anchors = torch.cat([best_anchor, anchors.expand(batch, heads, length, len(group))], dim=-1)
        top = torch.sort(all_scores, dim=-1, descending=True, stable=True)
        best_score = top.values[..., :num_spans]
        best_anchor = all_anchors.gather(-1, top.indices[..., :num_spans])
    return torch.where(torch.isfinite(best_score), best_anchor, torch.full_like(best_anchor, -1))


def span_bounds(anchors: torch.Tensor, window: int, back: float, fwd: float, sigma: float):
    """Inclusive span bounds ``(start, end) [B, H, L, n]`` (empty: start > end) and the window start ``[L]``."""
    length = anchors.shape[2]
    t = torch.arange(length, device=anchors.device)
    visible = (t + 1).double() ** sigma
    reach_back = torch.ceil(back * visible).long()
    reach_fwd = torch.ceil(fwd * visible).long()
    sw_start = (t - window + 1).clamp_min(0) if window > 0 else t + 1  # no window: empty [t + 1, t]
    start = (anchors - reach_back[:, None]).clamp_min(0)
    end = torch.minimum(anchors + reach_fwd[:, None], t[:, None])
    if window > 0:
        end = torch.minimum(end, (sw_start - 1)[:, None])
    valid = anchors >= 0
    start = torch.where(valid, start, torch.full_like(start, length))
    end = torch.where(valid, end, torch.full_like(end, -1))
    return start, end, sw_start


def gates(q1, k, anchors: torch.Tensor) -> torch.Tensor:
    """``g = softmax(u)`` over the selected anchors (fp32, differentiable in q1 and k; invalid -> 0, all
    invalid -> uniform)."""
    batch, heads, length, n = anchors.shape
    safe = anchors.clamp_min(0)
    keys = k.gather(2, safe.reshape(batch, heads, length * n, 1).expand(-1, -1, -1, k.shape[-1]))
    u = (q1.float()[:, :, :, None, :] * keys.float().reshape(batch, heads, length, n, -1)).sum(-1)
    valid = anchors >= 0
    u = u.masked_fill(~valid, float("-inf"))
    none = ~valid.any(dim=-1, keepdim=True)
    u = torch.where(none, torch.zeros_like(u), u)
    return torch.softmax(u, dim=-1)


def superlinear_reference(q, k, v, q1, routing, rows=None):
    """The per-span patterns written out: O_j = masked softmax over span_j U window; O = sum_j g_j O_j."""
    anchors, start, end, sw_start = routing(q1, k)
    g = gates(q1, k, anchors)
    batch, heads, length, dim = q.shape
    idx = torch.arange(length, device=q.device) if rows is None else rows.to(q.device)
    keys = torch.arange(length, device=q.device)
    # the rows= form (the gate's sample at a long length): the keys each chunk's rows see, in key blocks
    attend = masked_attention_rows if rows is not None and not torch.is_grad_enabled() else masked_attention
    outs = []
    for chunk in row_chunks(idx, batch * heads * length * 3):
        window = (keys[None, :] >= sw_start[chunk][:, None]) & (keys[None, :] <= chunk[:, None])  # [R, L]
        total = 0
        for j in range(anchors.shape[-1]):
            s, e = start[:, :, chunk, j, None], end[:, :, chunk, j, None]
            allowed = ((keys >= s) & (keys <= e)) | window[None, None]
            o_j = attend(q[:, :, chunk], k, v, allowed, 1.0 / math.sqrt(dim))
            total = total + g[:, :, chunk, j, None] * o_j
        outs.append(total)
    return torch.cat(outs, dim=2)


def span_pairs(start, end, sw_start, batch: int, heads: int, num_spans: int) -> int:
    """Attended pairs: every span's keys plus the window once per span, summed over batch and heads."""
    span = (end - start + 1).clamp_min(0).sum()
    t = torch.arange(sw_start.shape[0], device=sw_start.device)
    win = (t - sw_start + 1).clamp_min(0).sum() * batch * heads * num_spans
    return int(span + win)


PKG_OPTIONS = ("num_spans", "sw_index", "search_power", "backward_factor", "forward_factor", "span_power")
SUPERLINEAR_OPTIONS = PKG_OPTIONS + ("search",)  # superlinear_pkg takes all but search (its own search kernel)
SEARCHES = ("torch", "triton")
TRITON_MAX_SPANS = 8  # search: triton keeps the running top-k in registers (superlinear_search_triton.py)


def read_options(ctx, method: str, with_search: bool = True) -> dict:
    """The validated options of a case (``method_options.<method>.*``) with the stripe distances and window
    they give at the case's length; shared with ``superlinear_pkg`` (same fields, same defaults), which passes
    ``with_search=False`` (``search`` is not one of its options: cfg["search"] is then None)."""
    case = ctx.case
    opts = Options(ctx, method)
    num_spans = opts.int("num_spans", 3, minimum=1)
    sw_index = opts.int("sw_index", 0, minimum=0)
    power = opts.float("search_power", 0.5, minimum=0.0, maximum=1.0, exclusive_min=True)
    back = opts.float("backward_factor", 2.0, minimum=0.0)
    fwd = opts.float("forward_factor", 0.0, minimum=0.0)
    sigma = opts.float("span_power", 0.5, minimum=0.0, maximum=1.0)
    if not ctx.mask.causal or case.seq_q != case.seq_kv:
        raise Unsupported("Superlinear attention is defined for causal self attention only")
    length = case.seq_q
    distances = stripe_distances(length, power, sw_index)
    window = window_size(power, sw_index)
    if not distances:
        opts.unfit("sw_index", f"leaves no search stripe at seq {length} (f(sw_index + 1) > seq)")
    if num_spans > len(distances):
        opts.unfit("num_spans", f"must be <= the number of search stripes at seq {length} ({len(distances)}), "
                               f"got {num_spans}")
    search_impl = search_choice(ctx, opts, num_spans) if with_search else None
    return dict(options=opts, num_spans=num_spans, sw_index=sw_index, search_power=power, backward_factor=back,
                forward_factor=fwd, span_power=sigma, distances=distances, window=window, search=search_impl)


def search_choice(ctx, opts: Options, num_spans: int) -> str:
    """``method_options.<method>.search``: ``torch`` or ``triton``. A bad value, or ``triton`` with more than
    :data:`TRITON_MAX_SPANS` spans: ValueError naming the field. ``triton`` without CUDA (and without
    ``TRITON_INTERPRET=1``) or without triton installed: ``Unsupported`` naming the field."""
    value = opts.choice("search", "torch", SEARCHES)
    if value == "triton":
        if num_spans > TRITON_MAX_SPANS:
            opts.fail("num_spans", f"must be <= {TRITON_MAX_SPANS} with {opts.field('search')}=triton (the "
                                   f"running top-k lives in registers), got {num_spans}")
        import importlib.util

        from ..linear.linear_attn import triton_runnable

        why = "triton is not installed" if importlib.util.find_spec("triton") is None else triton_runnable(ctx.device)
        if why:
            raise Unsupported(f"{ctx.case.method} with {opts.field('search')}=triton: {why}")
    return value


@register_method(
    "superlinear",
    Capabilities(family="sparse", exact=False, masks={"causal"}, causal_only=True, backward=True, compiled=True),
    description="Superlinear multi-step attention (N=2): span search over ~sqrt(t) anchors, then attention on "
                "the top spans (FlexAttention with per-call BlockMasks), gated by the search scores",
    options=SUPERLINEAR_OPTIONS,
)
def build_superlinear(ctx):
    case = ctx.case
    cfg = read_options(ctx, "superlinear")
    num_spans, window, distances = cfg["num_spans"], cfg["window"], cfg["distances"]
    back, fwd, sigma = cfg["backward_factor"], cfg["forward_factor"], cfg["span_power"]
    length = case.seq_q
    attend = flex_path(ctx)
    batch, heads = case.batch, case.heads_q
    # the mask_mods read the span bounds of *this* call: fresh int32 tensors made per call and never written
    # afterwards. FlexAttention saves the tensors a mask_mod captures for its backward, so a shared buffer
    # rewritten for the next span (or the next call, while a graph is held in the bwd mode) fails the
    # autograd version check on CUDA ("IntTensor [spans, B, H, L] is at version 3; expected version 2").
    def span_mod(lo, hi, sw):
        def mask_mod(b, h, q_idx, kv_idx):
            in_span = (kv_idx >= lo[b, h, q_idx]) & (kv_idx <= hi[b, h, q_idx])
            return in_span | ((kv_idx >= sw[q_idx]) & (kv_idx <= q_idx))
        return mask_mod

    if cfg["search"] == "triton":  # the own kernel; the distances as an int32 tensor, made once
        from . import superlinear_search_triton

        dist_t = torch.tensor(distances, dtype=torch.int32, device=ctx.device)

        def fast_search(q1, k):
            return superlinear_search_triton.search(q1, k, dist_t, num_spans)
    else:
        def fast_search(q1, k):
            return search(q1, k, distances, num_spans)

    def routes(find):
        def routing(q1, k):
            anchors = find(q1, k)
            start, end, sw_start = span_bounds(anchors, window, back, fwd, sigma)
            return anchors, start, end, sw_start
        return routing

    routing = routes(fast_search)  # the fast path, its pairs and the routing phase: the chosen search
    reference_routing = routes(lambda q1, k: search(q1, k, distances, num_spans))  # the gate: always PyTorch

    def fn(q, k, v, q1):
        anchors, start, end, sw_start = routing(q1, k)
        g = gates(q1, k, anchors)
        sw = sw_start.to(torch.int32)
        window_lo = sw_start[None, None, :, None].expand(batch, heads, length, 1)
        window_hi = torch.arange(length, device=q.device)[None, None, :, None].expand(batch, heads, length, 1)
        out = 0
        for j in range(num_spans):
            mod = span_mod(start[..., j].to(torch.int32).contiguous(), end[..., j].to(torch.int32).contiguous(), sw)
            touched = ranges_to_blocks(torch.cat([start[..., j:j + 1], window_lo], -1),
                                       torch.cat([end[..., j:j + 1], window_hi], -1), length, 128)
            block_mask = dynamic_block_mask(touched, mod, length, length)
            out = out + g[..., j:j + 1] * attend(q, k, v, block_mask, False).float()
        return out.to(q.dtype)

    def reference(q, k, v, q1, rows=None):
        return superlinear_reference(q, k, v, q1, reference_routing, rows)

    def pairs(q, k, v, q1):
        _, start, end, sw_start = routing(q1, k)
        return span_pairs(start, end, sw_start, batch, heads, num_spans)

    return Prepared(fn=fn, reference=reference, extras={"q1": Extra(shape=(batch, heads, length, case.head_dim))},
                    attended_pairs=pairs, phases={"routing": lambda q, k, v, q1: routing(q1, k)})
