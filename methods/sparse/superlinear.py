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

The search (the ``routing`` phase): :func:`search`, computed in fp32 from diagonal bands of ``q1 . k`` stripe
by stripe (no gather; O(L^1.5 d) multiply-adds, memory-bound) with a running top-k, or the same anchors from one
own Triton kernel (``search: triton``, below); the reference always routes with :func:`search` (on a long
case's sampled rows with :func:`search_rows`, those rows only), so the gate compares the same routing. Fast
path: the gates from :func:`gates_chunked`, then per span index j one compiled FlexAttention call with a
``mask_mod`` reading the per-query span bounds and a ``BlockMask`` built per call from the bounds
(``BlockMask.from_kv_blocks``: per query block, the union of its queries' spans and windows), over the whole
sequence or chunk by chunk of query rows (``query_chunk``). Reference: the per-span boolean patterns written
out, masked softmax, the gated sum. The ``superlinear`` package (Triton, CUDA only) is not used here: it
computes the same operator with the same parameters and defaults (num_spans 2-3 and search_power < 1 only) and
is registered beside this method as ``superlinear_pkg`` (superlinear_pkg.py: the finding and the mapping).

Options: ``num_spans`` (3), ``sw_index`` (s, 0), ``search_power`` (p, 0.5, in (0, 1]), ``backward_factor``
(2.0), ``forward_factor`` (0.0), ``span_power`` (sigma, 0.5), ``search``, ``query_chunk``, ``query_order``.

``query_order`` (``auto``, the default; ``natural``; ``sorted``): the order of the query rows in each span's
FlexAttention call. A BlockMask lists, per block of 128 rows, the union of its rows' key ranges; in position order
the rows of a block pick unrelated stripes, and on the benchmark's random inputs that union covers 73 % of the
causal tiles per span at 64K (27 % at 1M): FlexAttention computes 70x (64K) to 104x (1M) the pairs the method
attends (results/cpu-superlinear-tiles, scripts/superlinear_tiles.py). ``sorted`` gathers the rows per (batch,
head) in the order of span j's start (stable), runs the call with a mask_mod that reads each row's position from
that order (:func:`sorted_span_mask_mod`) and scatters the outputs back: the same outputs and gradients, 2.9x
(16K) to 1.6x (1M) the attended pairs on the same inputs; one gather of q and one scatter of the output per
span more. It suits configurations without a local window (the default ``sw_index`` 0): a window follows the position, so in
sorted order the windows of a block's rows are scattered. ``auto`` is ``sorted`` with ``sw_index`` 0 and
``natural`` with a window; ``fn.resolved["query_order"]`` says which. Measured on the H200 (causal, 16 heads, d 128,
bf16; results/h200-superlinear-sorted against results/h200-superlinear-v2): fwd 33.7 / 228 / 1,894 ms at 64K /
256K / 1M against natural's 142 / 1,366 / 12,935 ms, fwd_bwd 64.8 / 378 ms at 64K / 256K against 475 / 4,705 ms
(and 3,824 ms at 1M), the same approx_err (the same outputs).

``search`` (``auto``, the default; ``torch``; ``triton``): how the fast path and the ``routing`` phase search.
``torch`` is :func:`search`; ``triton`` is one own kernel (superlinear_search_triton.py: per head and block of
queries, q1 loaded once, the stripes walked with a running top-k in registers; the same anchors, ties
included), ``num_spans`` <= 8, on CUDA or with ``TRITON_INTERPRET=1`` (elsewhere the case is ``unsupported``
naming the field: no silent fallback). ``auto`` is ``triton`` on a CUDA device where the kernel runs, else
``torch`` (:func:`search_choice`: measured on an H200, 16 heads, d 128, bf16, causal, ``triton`` made the whole
fwd call 1,369 ms at 256K against 2,553 ms with ``torch``: results/h200-superlinear-search/rows.jsonl,
results/h200-sparse/rows.jsonl, results/h200-sparse/sparse-summary.md). ``fn.resolved`` holds the choice (the
row's ``method_options`` column holds the config as given). ``superlinear_pkg`` takes neither ``search`` nor
``query_chunk`` (the package's own kernels): the registry refuses the keys there, naming the field.

``query_chunk`` (``auto``, the default, or a multiple of 128): query rows per chunk of the span attention. Each
chunk builds its own BlockMasks, ``[B, H, chunk/128, L/128]``, and with gradients runs under
``torch.utils.checkpoint``: nothing of a chunk's span attention (BlockMasks, FlexAttention's saved outputs) is
kept for the backward, which recomputes it chunk by chunk - one more span-attention forward per fwd_bwd call,
the price of memory linear in L (:func:`saved_bytes_model`). ``auto`` (:func:`auto_query_chunk`): the whole
sequence while one BlockMask has at most 2^27 block entries (16 heads, batch 1: up to 256K, the committed
rows' path, no recompute), else the fewest equal chunks under it (2 at 512K, 8 of 128K at 1M).

Memory (H200, 16 heads, d 128, bf16, 3 spans; the committed rows' peak_mem_mb). Before the gates were chunked
and the spans chunked and checkpointed, the fast path held 4.4 KB per token-head above its inputs in fwd (the
written-out gates' ``[B, H, L, n, D]`` gathered keys and their fp32 copies: 17,794 MB above the inputs at 256K)
and 6.7 KB in fwd_bwd (fp32 copies of q1, of the gathered keys and of every span's output saved for the
backward: 26,768 MB at 256K), plus at 1M 24 GiB of BlockMask index lists saved (quadratic: ``8 B H (L/128)^2``
per span) and their builds' transients: projected 141 GiB at 1M fwd_bwd, where the H200 (139.8 GiB) ran out
("Tried to allocate 12.00 GiB" in the forward, in FlexAttention's ``_transpose_ordered`` argsort of a span's
``[16, 8192, 8192]`` list, 127 GiB already allocated). Now: 0.7 KB / 2.2 KB per token-head above the inputs
(fwd / fwd_bwd), projected 27 GiB / 54 GiB at 1M with the inputs (plus the CUDA sorts' own scratch, ~12 B an
entry of a 2^27-entry chunk list: ~1.5 GiB). How: tests/test_superlinear_memory.py replays the fast path on the
CPU with a FlexAttention stand-in that allocates and saves what the CUDA kernel does (out, lse; dq, dk, dv)
under a tracker of live tensor bytes, at a small length with the 1M case's ratios (block entries per query
``L / b^2`` = 64, 8 chunks, the gates' steps); the same replay of the previous code at small lengths gives
4,452 / 6,692 B per token-head, the H200's 256K rows within 0.1 %. tests/test_sparse_gpu.py compares the
replay with the allocator's peak on the device (64K, 8 chunks).
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..contract import Extra, Prepared
from ..registry import Capabilities, Unsupported, register_method
from .common import (Options, block_mask_from_flags, flex_path, masked_attention, masked_attention_rows,
                     ranges_to_blocks, row_chunks)

STRIPE_GROUP = 16  # stripes scored before each running top-k
FLEX_BLOCK = 128  # FlexAttention's sparse block (the compiled kernels' granularity); CPU tests may use a smaller one
ORDER_FAULT = False  # tests' negative control of query_order sorted: the outputs left in the sorted order
CHUNK_BLOCK_ENTRIES = 1 << 27  # query_chunk auto: BlockMask entries (B H q_blocks kv_blocks) per chunk and span
GATE_CHUNK_ELEMS = 1 << 26  # gate scores: gathered key elements (B H rows n D) per step
SEARCH_ROWS_ELEMS = 1 << 27  # the reference's rows= search: gathered key elements (B H rows stripes D) per step


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


def search_rows(q1, k, distances: list[int], num_spans: int, rows: torch.Tensor,
                budget_elems: int | None = None) -> torch.Tensor:
    """:func:`search` for the query rows ``rows`` only: anchors ``[B, H, len(rows), n]`` (long, -1 invalid), the
    same rule (fp32 raw dot products ``q1_t . k_{t-d}``; higher score first, on equal scores the smaller
    distance; ``-inf`` for ``t - d < 0``). For the ``rows=`` form of the reference (the gate's sample of a long
    case): O(rows x stripes x D) instead of :func:`search`'s O(L x stripes x D) and its ``[B, H, L, n]`` arrays.
    One *stable* descending sort over all stripes in ascending distance gives what the running top-k of
    :func:`search` gives (ties: the earlier stripe first). The key rows are gathered ``budget_elems``
    (default :data:`SEARCH_ROWS_ELEMS`) elements at a time."""
    batch, heads, _, dim = q1.shape
    budget = SEARCH_ROWS_ELEMS if budget_elems is None else budget_elems
    dist = torch.tensor(distances, dtype=torch.long, device=q1.device)
    outs = []
    for chunk in row_chunks(rows.to(q1.device), batch * heads * len(distances) * dim, budget):
        src = chunk[:, None] - dist[None, :]  # [r, S] key rows
        valid = src >= 0
        keys = k.detach()[:, :, src.clamp_min(0).reshape(-1)].float().reshape(batch, heads, chunk.numel(),
                                                                               len(distances), dim)
        scores = (q1.detach()[:, :, chunk].float()[:, :, :, None, :] * keys).sum(dim=-1)
        scores = scores.masked_fill(~valid, float("-inf"))
        top = torch.sort(scores, dim=-1, descending=True, stable=True)
        best = top.indices[..., :num_spans]
        anchors = src.expand(batch, heads, -1, -1).gather(-1, best)
        outs.append(torch.where(torch.isfinite(top.values[..., :num_spans]), anchors, torch.full_like(anchors, -1)))
    return torch.cat(outs, dim=2)


def span_bounds(anchors: torch.Tensor, window: int, back: float, fwd: float, sigma: float,
                positions: torch.Tensor | None = None, length: int | None = None):
    """Inclusive span bounds ``(start, end) [B, H, R, n]`` (empty: start > end, with start = ``length``) and the
    window start ``[R]`` of the queries at ``positions`` (``[R]``; default all ``R = L`` rows, ``length`` = L)."""
    length = anchors.shape[2] if length is None else length
    t = torch.arange(length, device=anchors.device) if positions is None else positions.to(anchors.device)
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


def gate_softmax(u: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``g = softmax(u)`` over the selected anchors (invalid -> 0, all invalid -> uniform)."""
    valid = anchors >= 0
    u = u.masked_fill(~valid, float("-inf"))
    none = ~valid.any(dim=-1, keepdim=True)
    u = torch.where(none, torch.zeros_like(u), u)
    return torch.softmax(u, dim=-1)


def gates(q1, k, anchors: torch.Tensor) -> torch.Tensor:
    """``g = softmax(u)``, ``u = q1_t . k_a`` over the selected anchors, written out (the reference's form; fp32,
    differentiable in q1 and k; invalid -> 0, all invalid -> uniform). ``q1`` holds the rows ``anchors`` is
    for (all L, or the reference's sampled rows). It gathers ``[B, H, R, n, D]`` keys and keeps fp32 copies of
    them for the backward: the fast path uses :func:`gates_chunked` (the same values)."""
    batch, heads, length, n = anchors.shape
    safe = anchors.clamp_min(0)
    keys = k.gather(2, safe.reshape(batch, heads, length * n, 1).expand(-1, -1, -1, k.shape[-1]))
    u = (q1.float()[:, :, :, None, :] * keys.float().reshape(batch, heads, length, n, -1)).sum(-1)
    return gate_softmax(u, anchors)


def _gather_keys(k: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """``k [B, H, L, D]`` at the rows ``safe [B, H, R, n]`` (>= 0): ``[B, H, R, n, D]`` in k's dtype."""
    batch, heads, rows, n = safe.shape
    index = safe.reshape(batch, heads, rows * n, 1).expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, index).reshape(batch, heads, rows, n, k.shape[-1])


class _GateScores(torch.autograd.Function):
    """``u [B, H, L, n]`` (fp32) ``= q1_t . k_{a_tj}`` in steps of ``step`` query rows, keeping nothing but its
    inputs (q1, k, anchors) for the backward. The written-out form (:func:`gates`) gathers ``[B, H, L, n, D]``
    keys at once and autograd keeps fp32 copies of them and of q1 (2 KB per token and head at n = 3, D = 128
    in bf16: 32 GiB at 1M tokens x 16 heads; its forward peak 4.3 KB). Per step the same expression, so the
    same values; backward: ``dq1 = sum_j du_j k_{a_j}`` (fp32, rounded to q1's dtype once, as autograd's
    cast does) and ``dk`` accumulated in fp32 by ``index_add_`` over the flat (batch, head, row) index, rounded
    to k's dtype once (the written-out form rounds each contribution to k's dtype before its ``scatter_add``:
    equal in fp32, closer to exact in bf16). Invalid anchors (-1) read row 0; their ``du`` is 0 (the softmax
    gives them weight 0)."""

    @staticmethod
    def forward(ctx, q1, k, anchors, step: int):
        batch, heads, length, n = anchors.shape
        safe = anchors.clamp_min(0)
        u = torch.empty(batch, heads, length, n, dtype=torch.float32, device=q1.device)
        for s in range(0, length, step):
            keys = _gather_keys(k, safe[:, :, s:s + step])
            u[:, :, s:s + step] = (q1[:, :, s:s + step].float()[:, :, :, None, :] * keys.float()).sum(-1)
        ctx.save_for_backward(q1, k, anchors)
        ctx.step = step
        return u

    @staticmethod
    def backward(ctx, du):
        q1, k, anchors = ctx.saved_tensors
        step = ctx.step
        batch, heads, length, n = anchors.shape
        dim = k.shape[-1]
        safe = anchors.clamp_min(0)
        want_q1, want_k = ctx.needs_input_grad[:2]
        dq1 = torch.empty_like(q1) if want_q1 else None
        acc = torch.zeros(batch * heads * length, dim, dtype=torch.float32, device=k.device) if want_k else None
        base = (torch.arange(batch * heads, device=k.device) * length).view(batch, heads, 1, 1)
        for s in range(0, length, step):
            du_s = du[:, :, s:s + step, :, None]  # [B, H, r, n, 1]
            if want_q1:
                keys = _gather_keys(k, safe[:, :, s:s + step])
                dq1[:, :, s:s + step] = (du_s * keys.float()).sum(dim=-2)
            if want_k:
                part = du_s * q1[:, :, s:s + step].float()[:, :, :, None, :]  # [B, H, r, n, D]
                acc.index_add_(0, (base + safe[:, :, s:s + step]).reshape(-1), part.reshape(-1, dim))
        dk = acc.view(batch, heads, length, dim).to(k.dtype) if want_k else None
        return dq1, dk, None, None


def gates_chunked(q1, k, anchors: torch.Tensor, budget_elems: int | None = None) -> torch.Tensor:
    """:func:`gates` (the same values) through :class:`_GateScores`: the gathered keys ``budget_elems`` (default
    :data:`GATE_CHUNK_ELEMS`) elements at a time, nothing of them kept for the backward."""
    batch, heads, length, n = anchors.shape
    budget = GATE_CHUNK_ELEMS if budget_elems is None else budget_elems
    step = max(1, budget // max(1, batch * heads * n * k.shape[-1]))
    return gate_softmax(_GateScores.apply(q1, k, anchors, step), anchors)


def superlinear_reference(q, k, v, q1, routing, rows=None, routing_rows=None):
    """The per-span patterns written out: O_j = masked softmax over span_j U window; O = sum_j g_j O_j.

    ``routing(q1, k)`` gives the anchors, span bounds and window starts of all L rows. With ``rows`` (the gate's
    sample of a long case) and ``routing_rows(q1, k, rows)`` (the same for those rows only: ``[B, H, R, n]``,
    ``[R]``), only the sampled rows are routed and gated: without it, the search and the gates ran over all L
    rows for a sample of 512 (at 1M tokens: the PyTorch search over ~1K stripes and ``[B, H, L, n, D]`` fp32
    keys, to use 1/2048 of them)."""
    batch, heads, length, dim = q.shape
    local = rows is not None and routing_rows is not None
    if local:
        idx = rows.to(q.device)
        anchors, start, end, sw_start = routing_rows(q1, k, idx)
        g = gates(q1[:, :, idx], k, anchors)
    else:
        anchors, start, end, sw_start = routing(q1, k)
        g = gates(q1, k, anchors)
        idx = torch.arange(length, device=q.device) if rows is None else rows.to(q.device)
    keys = torch.arange(length, device=q.device)
    # the rows= form (the gate's sample at a long length): the keys each chunk's rows see, in key blocks
    attend = masked_attention_rows if rows is not None and not torch.is_grad_enabled() else masked_attention
    outs = []
    for here in row_chunks(torch.arange(idx.numel(), device=q.device), batch * heads * length * 3):
        chunk = idx[here]  # the rows' positions
        at = here if local else chunk  # where the routing arrays hold them
        window = (keys[None, :] >= sw_start[at][:, None]) & (keys[None, :] <= chunk[:, None])  # [R, L]
        total = 0
        for j in range(anchors.shape[-1]):
            s, e = start[:, :, at, j, None], end[:, :, at, j, None]
            allowed = ((keys >= s) & (keys <= e)) | window[None, None]
            o_j = attend(q[:, :, chunk], k, v, allowed, 1.0 / math.sqrt(dim))
            total = total + g[:, :, at, j, None] * o_j
        outs.append(total)
    return torch.cat(outs, dim=2)


def span_pairs(start, end, sw_start, batch: int, heads: int, num_spans: int) -> int:
    """Attended pairs: every span's keys plus the window once per span, summed over batch and heads."""
    span = (end - start + 1).clamp_min(0).sum()
    t = torch.arange(sw_start.shape[0], device=sw_start.device)
    win = (t - sw_start + 1).clamp_min(0).sum() * batch * heads * num_spans
    return int(span + win)


PKG_OPTIONS = ("num_spans", "sw_index", "search_power", "backward_factor", "forward_factor", "span_power")
# superlinear_pkg takes all but search (its own search kernel) and query_chunk (its own span kernel)
SUPERLINEAR_OPTIONS = PKG_OPTIONS + ("search", "query_chunk", "query_order")
SEARCHES = ("auto", "torch", "triton")
QUERY_ORDERS = ("natural", "sorted")  # the span attention's query rows: in position order, or per span by its start
TRITON_MAX_SPANS = 8  # search: triton keeps the running top-k in registers (superlinear_search_triton.py)


def read_options(ctx, method: str, with_search: bool = True) -> dict:
    """The validated options of a case (``method_options.<method>.*``) with the stripe distances and window
    they give at the case's length; shared with ``superlinear_pkg`` (same fields, same defaults), which passes
    ``with_search=False`` (``search`` and ``query_chunk`` are not options of it: cfg["search"] and
    cfg["query_chunk"] are then None). Every value is checked (ValueError naming the field) before a value
    that does not fit the case is refused (``unsupported``)."""
    case = ctx.case
    opts = Options(ctx, method)
    num_spans = opts.int("num_spans", 3, minimum=1)
    sw_index = opts.int("sw_index", 0, minimum=0)
    power = opts.float("search_power", 0.5, minimum=0.0, maximum=1.0, exclusive_min=True)
    back = opts.float("backward_factor", 2.0, minimum=0.0)
    fwd = opts.float("forward_factor", 0.0, minimum=0.0)
    sigma = opts.float("span_power", 0.5, minimum=0.0, maximum=1.0)
    search_value = opts.choice("search", "auto", SEARCHES) if with_search else None
    chunk_value = query_chunk_value(ctx, opts) if with_search else None
    order = opts.choice("query_order", "auto", ("auto",) + QUERY_ORDERS) if with_search else None
    if order == "auto":  # sorted where it was measured faster (no local window: sw_index 0), else position order
        order = "sorted" if sw_index == 0 else "natural"
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
    search_impl = search_choice(ctx, opts, num_spans, search_value) if with_search else None
    chunk = None
    if with_search:
        chunk = (auto_query_chunk(case.batch, case.heads_q, length) if chunk_value == "auto"
                 else min(chunk_value, length))
    return dict(options=opts, num_spans=num_spans, sw_index=sw_index, search_power=power, backward_factor=back,
                forward_factor=fwd, span_power=sigma, distances=distances, window=window, search=search_impl,
                query_chunk=chunk, query_order=order)


def triton_search_runs(device, num_spans: int) -> str | None:
    """None when ``search: triton`` can run on ``device``, else why not: triton not installed, no CUDA device
    (nor ``TRITON_INTERPRET=1``: ``linear_attn.triton_runnable``, the helper the Triton methods share), or more
    than :data:`TRITON_MAX_SPANS` spans."""
    import importlib.util

    from ..linear.linear_attn import triton_runnable

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    why = triton_runnable(device)
    if why:
        return why
    if num_spans > TRITON_MAX_SPANS:
        return f"num_spans {num_spans} > {TRITON_MAX_SPANS} (the kernel's running top-k lives in registers)"
    return None


def search_choice(ctx, opts: Options, num_spans: int, value: str | None = None) -> str:
    """``method_options.<method>.search`` resolved: ``torch`` or ``triton`` (``value``: the validated option,
    read here when None).

    ``auto`` (the default): ``triton`` on a CUDA device where the kernel runs (:func:`triton_search_runs`),
    else ``torch`` - the measured-faster search where it runs (H200, causal, 16 heads, d 128, bf16, 3 spans:
    the fast path's ``routing`` phase 0.58 / 1.98 / 14.9 / 124 ms with ``triton`` at 4K / 16K / 64K / 256K,
    results/h200-superlinear-search/rows.jsonl, against 7.14 / 22.6 / 167 / 1,307 ms with ``torch``,
    results/h200-sparse/rows.jsonl; the whole fwd call at 256K 1,369 ms against 2,553 ms, ~51 % of it
    routing; summary results/h200-sparse/sparse-summary.md). Not under ``TRITON_INTERPRET=1`` on the CPU: the
    interpreter is a correctness tool (the tests), not a fast path. Explicit ``torch`` / ``triton`` are kept:
    ``triton`` with more than :data:`TRITON_MAX_SPANS` spans is a ValueError naming ``num_spans``; ``triton``
    where it cannot run (no CUDA nor interpreter, triton missing) is ``Unsupported`` naming the field (no
    silent fallback). A bad value: ValueError naming the field."""
    if value is None:
        value = opts.choice("search", "auto", SEARCHES)
    if value == "auto":
        if torch.device(ctx.device).type != "cuda":
            return "torch"
        return "torch" if triton_search_runs(ctx.device, num_spans) else "triton"
    if value == "triton":
        if num_spans > TRITON_MAX_SPANS:
            opts.fail("num_spans", f"must be <= {TRITON_MAX_SPANS} with {opts.field('search')}=triton (the "
                                   f"running top-k lives in registers), got {num_spans}")
        why = triton_search_runs(ctx.device, num_spans)
        if why:
            raise Unsupported(f"{ctx.case.method} with {opts.field('search')}=triton: {why}")
    return value


def query_chunk_value(ctx, opts: Options):
    """``method_options.<method>.query_chunk``: ``auto`` (default) or a positive multiple of :data:`FLEX_BLOCK`
    (ValueError naming the field otherwise)."""
    value = ctx.param("query_chunk", "auto")
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < FLEX_BLOCK or value % FLEX_BLOCK:
        opts.fail("query_chunk", f"must be 'auto' or a positive multiple of {FLEX_BLOCK} (query rows per chunk of "
                                 f"the span attention), got {value!r}")
    return value


def auto_query_chunk(batch: int, heads: int, length: int, budget: int | None = None) -> int:
    """``query_chunk: auto``: the whole sequence while one BlockMask of it (``B H ceil(L/128)^2`` block entries,
    int32, twice: the kv lists and their transpose) holds at most ``budget`` (default
    :data:`CHUNK_BLOCK_ENTRIES`, 2^27 = 512 MiB a list) entries, else the fewest equal chunks (multiples of
    :data:`FLEX_BLOCK`) under it. 16 heads, batch 1: one chunk up to 256K (the committed rows' path), two at
    512K, eight of 128K at 1M."""
    budget = CHUNK_BLOCK_ENTRIES if budget is None else budget
    kv_blocks = -(-length // FLEX_BLOCK)
    q_blocks = max(1, budget // max(1, batch * heads * kv_blocks))
    if q_blocks * FLEX_BLOCK >= length:
        return length
    count = -(-length // (q_blocks * FLEX_BLOCK))
    return -(-(-(-length // count)) // FLEX_BLOCK) * FLEX_BLOCK


def saved_bytes_model(batch: int, heads: int, length: int, dim: int, elem_bytes: int, num_spans: int,
                      query_chunk: int, block: int | None = None) -> int:
    """Bytes the fast path keeps for its backward with ``query_order: natural`` (sorted keeps more per span: its row
    order and gathered rows; measured 23.6 GB against 18.8 at 256K fwd_bwd on the H200) beyond q, k, v, q1
    themselves (autograd's saved tensors, each
    storage once, as ``torch.autograd.graph.saved_tensors_hooks`` counts them), FlexAttention saving what its
    compiled kernel saves (q, k, v, out, lse, the BlockMask's index tensors, the mask_mod's tensors).
    ``P = B H L`` token-heads, ``n`` spans, ``e`` = elem_bytes:

    * always: the anchors (int64, :class:`_GateScores`) ``8 n P``, the gate softmax's output ``4 n P`` and its
      masks (invalid anchors, rows with none) ``(n + 1) P``;
    * one chunk (``query_chunk >= L``, no checkpoint): per span the span bounds as int32 (``8 P``),
      FlexAttention's out (``e D P``) and lse (``4 P``), and the BlockMask's kv lists and their transpose, int32
      ``[B, H, L/b, L/b]`` each (``8 E``, ``E = B H ceil(L/b)^2``, b = :data:`FLEX_BLOCK`) with their counts,
      plus the window starts (int32 ``4 L``): quadratic in L through ``E`` (at b = 128, 16 heads, 3 spans:
      24 GiB at 1M, 1.5 GiB at 256K);
    * several chunks (checkpointed): the chunks' inputs only, i.e. the span bounds ``start``, ``end`` (int64,
      ``16 n P``), window starts and positions (``16 L``): linear in L, whatever the length.

    The pre-chunk form (the committed rows) kept in addition fp32 copies of q1 and of the gathered keys
    (``4 D (n + 1) P``, the written-out :func:`gates`) and of every span's output (``4 D n P``): 4.4 KB per
    token-head at d 128, 3 spans (tests/test_superlinear_memory.py measures all three forms)."""
    b = FLEX_BLOCK if block is None else block
    n = num_spans
    tokens = batch * heads * length
    always = (8 * n + 4 * n + n + 1) * tokens
    if query_chunk < length:
        return always + 16 * n * tokens + 16 * length
    q_blocks = kv_blocks = -(-length // b)
    entries = batch * heads * q_blocks * kv_blocks
    per_span = (8 + elem_bytes * dim + 4) * tokens + 8 * entries + 4 * batch * heads * (q_blocks + kv_blocks)
    return always + n * per_span + 4 * length


def span_mask_mod(lo: torch.Tensor, hi: torch.Tensor, sw: torch.Tensor, qpos: torch.Tensor | None = None):
    """The FlexAttention ``mask_mod`` of one span: key in ``[lo, hi]`` (the query's span, ``[B, H, rows]``) or in
    its window ``[sw, t]`` (``[rows]``). ``qpos``: the query positions ``t`` of a chunk of rows (``q_idx`` counts
    from the chunk's first row); None for the whole sequence (``q_idx`` is ``t``: the mask_mod the committed rows
    ran). The tensors are fresh per call and never written afterwards: FlexAttention saves what a mask_mod
    captures for its backward, so a shared buffer rewritten for the next span (or the next call, while a graph
    is held in the bwd mode) fails the autograd version check on CUDA ("IntTensor [spans, B, H, L] is at
    version 3; expected version 2")."""
    if qpos is None:
        def mask_mod(b, h, q_idx, kv_idx):
            in_span = (kv_idx >= lo[b, h, q_idx]) & (kv_idx <= hi[b, h, q_idx])
            return in_span | ((kv_idx >= sw[q_idx]) & (kv_idx <= q_idx))
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            in_span = (kv_idx >= lo[b, h, q_idx]) & (kv_idx <= hi[b, h, q_idx])
            return in_span | ((kv_idx >= sw[q_idx]) & (kv_idx <= qpos[q_idx]))
    return mask_mod


def sorted_span_mask_mod(lo: torch.Tensor, hi: torch.Tensor, sw: torch.Tensor, qpos: torch.Tensor):
    """The ``mask_mod`` of one span over query rows in a per-(batch, head) order (``query_order: sorted``): row
    ``q_idx`` of head ``h`` is the query at position ``qpos[b, h, q_idx]``, with span ``[lo, hi]`` and window
    ``[sw, qpos]`` (all ``[B, H, rows]``)."""
    def mask_mod(b, h, q_idx, kv_idx):
        in_span = (kv_idx >= lo[b, h, q_idx]) & (kv_idx <= hi[b, h, q_idx])
        return in_span | ((kv_idx >= sw[b, h, q_idx]) & (kv_idx <= qpos[b, h, q_idx]))
    return mask_mod


def sorted_rows(start_j: torch.Tensor, pos_c: torch.Tensor, sw_c: torch.Tensor):
    """``query_order: sorted``: the permutation of a chunk's query rows ``[B, H, rows]`` that sorts them by the
    start of span ``j`` (stable; empty spans, start = L, last), and the rows' positions and window starts in that
    order."""
    perm = torch.argsort(start_j, dim=-1, stable=True)
    return perm, pos_c[perm], sw_c[perm]


def span_block_flags(start_j, end_j, sw_c, pos_c, length: int, order: str):
    """Span j's key-block flags ``[B, H, rows/b, L/b]`` (b = :data:`FLEX_BLOCK`) for query rows at positions
    ``pos_c`` with window starts ``sw_c`` (``[rows]``) and span bounds ``start_j``, ``end_j`` (``[B, H, rows]``):
    per block of rows, the union of their span and window, in the order the fast path calls FlexAttention
    (``query_order``). ``natural``: ``(flags, None, None)``; ``sorted``: ``(flags, perm, (lo, hi, sw, pos))``, the
    rows' permutation (:func:`sorted_rows`) and their bounds in that order. scripts/superlinear_tiles.py counts
    these same flags."""
    if order == "sorted":
        perm, pos_p, sw_p = sorted_rows(start_j, pos_c, sw_c)
        lo_p, hi_p = start_j.gather(-1, perm), end_j.gather(-1, perm)
        flags = ranges_to_blocks(torch.stack([lo_p, sw_p], -1), torch.stack([hi_p, pos_p], -1), length, FLEX_BLOCK,
                                 FLEX_BLOCK)
        return flags, perm, (lo_p, hi_p, sw_p, pos_p)
    flags = ranges_to_blocks(torch.stack([start_j, sw_c.expand_as(start_j)], -1),
                             torch.stack([end_j, pos_c.expand_as(end_j)], -1), length, FLEX_BLOCK, FLEX_BLOCK)
    return flags, None, None


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
    chunk = cfg["query_chunk"]
    order = cfg["query_order"]
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

    def reference_routing_rows(q1, k, rows):  # the gate's sampled rows of a long case: those rows only
        anchors = search_rows(q1, k, distances, num_spans, rows)
        start, end, sw_start = span_bounds(anchors, window, back, fwd, sigma, positions=rows, length=length)
        return anchors, start, end, sw_start

    def chunk_attention(q_c, k, v, g_c, start_c, end_c, sw_c, pos_c):
        """``sum_j g_j O_j`` for the query rows ``q_c`` (positions ``pos_c``; all L rows or one chunk), in q's
        dtype: per span a BlockMask of the chunk's rows (``[B, H, rows/128, L/128]``) and one FlexAttention
        call. ``g_j * O_j`` promotes O_j to fp32 in the product itself: autograd keeps O_j as FlexAttention
        returned (and saved) it, not an fp32 copy (the values and gradients of ``g_j * O_j.float()``)."""
        rows = q_c.shape[2]
        whole = rows == length
        sw = sw_c.to(torch.int32)
        qpos = None if whole else pos_c.to(torch.int32)
        out = None
        for j in range(num_spans):
            touched, perm, bounds = span_block_flags(start_c[..., j], end_c[..., j], sw_c, pos_c, length, order)
            if perm is not None:  # sorted: the rows grouped by their span's start, each 128-row block's keys few
                mod = sorted_span_mask_mod(*(t.to(torch.int32).contiguous() for t in bounds))
                block_mask = block_mask_from_flags(touched, mod, rows, length, FLEX_BLOCK)
                expand = (-1, -1, -1, q_c.shape[-1])
                o_p = attend(q_c.gather(2, perm[..., None].expand(*expand)), k, v, block_mask, False)
                o_j = o_p if ORDER_FAULT else torch.empty_like(o_p).scatter(2, perm[..., None].expand(*expand), o_p)
                term = g_c[..., j:j + 1] * o_j
            else:
                mod = span_mask_mod(start_c[..., j].to(torch.int32).contiguous(),
                                    end_c[..., j].to(torch.int32).contiguous(), sw, qpos)
                block_mask = block_mask_from_flags(touched, mod, rows, length, FLEX_BLOCK)
                term = g_c[..., j:j + 1] * attend(q_c, k, v, block_mask, False)
            out = term if out is None else out + term
        return out.to(q_c.dtype)

    def fn(q, k, v, q1):
        anchors, start, end, sw_start = routing(q1, k)
        g = gates_chunked(q1, k, anchors)
        positions = torch.arange(length, device=q.device)
        if chunk >= length:
            return chunk_attention(q, k, v, g, start, end, sw_start, positions)
        # chunks of query rows; with gradients each under a checkpoint: its BlockMasks and FlexAttention's saved
        # outputs are recomputed chunk by chunk in the backward instead of kept for all rows
        pieces = []
        for part in zip(q.split(chunk, 2), g.split(chunk, 2), start.split(chunk, 2), end.split(chunk, 2),
                        sw_start.split(chunk), positions.split(chunk)):
            q_c, g_c, start_c, end_c, sw_c, pos_c = part
            if torch.is_grad_enabled():
                pieces.append(checkpoint(chunk_attention, q_c, k, v, g_c, start_c, end_c, sw_c, pos_c,
                                         use_reentrant=False))
            else:
                pieces.append(chunk_attention(q_c, k, v, g_c, start_c, end_c, sw_c, pos_c))
        return torch.cat(pieces, dim=2)

    # the resolved options (the row's method_options column holds the config as given: ``search`` may be ``auto``)
    fn.resolved = {"search": cfg["search"], "query_chunk": chunk, "query_order": order}

    def reference(q, k, v, q1, rows=None):
        return superlinear_reference(q, k, v, q1, reference_routing, rows, reference_routing_rows)

    def pairs(q, k, v, q1):
        _, start, end, sw_start = routing(q1, k)
        return span_pairs(start, end, sw_start, batch, heads, num_spans)

    return Prepared(fn=fn, reference=reference, extras={"q1": Extra(shape=(batch, heads, length, case.head_dim))},
                    attended_pairs=pairs, phases={"routing": lambda q, k, v, q1: routing(q1, k)})
