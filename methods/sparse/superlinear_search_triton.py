"""Superlinear attention's span search (the ``routing`` phase of ``superlinear``, methods/sparse/superlinear.py)
as one Triton kernel: ``method_options.superlinear.search: triton``. Imported lazily by the builder: importing
this module imports triton.

What it computes: :func:`superlinear.search` exactly, anchors included on exact ties. For every query ``t`` and
every stripe distance ``d`` (``stripe_distances``: ``f(i) - 1`` for the stripes ``i > sw_index``, ascending),
the fp32 raw dot product ``u = q1_t . k_{t-d}`` (invalid where ``t - d < 0``); out: the ``num_spans`` best
anchors ``t - d`` per query ``[B, H, L, num_spans]`` int64, best first, ``-1`` where fewer than ``num_spans``
stripes are valid (small ``t``). Order, the rule both searches follow: higher score first; among equal scores
the smaller distance (the later anchor) first. The PyTorch search gets that from a *stable* descending sort of
``cat([best so far, next group of stripes])`` (``torch.topk`` breaks ties arbitrarily: on the CPU it returned
indices 1, 6, 4 of ``[1, 2, 2, 0, 2, -inf, 2]``), the kernel from the order it visits the stripes in (below).

Kernel (:func:`_search_src`, grid ``(cdiv(L, BLOCK_T), B * H)``): one program per head and block of
``BLOCK_T`` queries. It loads its q1 block once (any float dtype, widened to fp32; head dims up to
``BLOCK_D`` = 128 stay in registers, wider ones are walked in ``BLOCK_D`` chunks and q1 is re-read per stripe,
from cache), then walks the stripe distances in ascending order (an int32 tensor on the device) and for each
loads the k rows ``t - d`` of its block (one contiguous run of ``BLOCK_T`` rows; rows with ``t - d < 0`` or
``t >= L`` masked) and computes the row-wise dot in fp32 (a product and a sum over the head dim, no
``tl.dot``: every query meets its own key). A running top-``num_spans`` per query is kept in registers as an
unsorted set ``[BLOCK_T, NS]`` of (score, anchor) (``NS`` = ``num_spans`` rounded up to a power of two; the
padding columns hold ``+inf`` and are never replaced or stored): the new stripe replaces the set's worst entry
(the lowest score, on equal scores the smallest anchor = the largest distance) when its score is *strictly*
higher. Stripes come in ascending distance, so a later stripe never displaces an equal score: this is the
rule above. Empty slots start at ``(-inf, -1 - j)`` (distinct anchors, so the order is total) and an invalid
stripe scores ``-inf``, so it never enters. At the end each entry's rank is counted pairwise under the same
order (``[BLOCK_T, NS, NS]`` comparisons) and the anchor is stored at its rank's slot; negative anchors (slots
never filled) are stored as -1.

Numerics: both searches score in fp32 from the same (widened) values, but in a different summation order
(the kernel's tree sum over ``BLOCK_D`` columns, PyTorch's vectorised row sum), so two scores that differ only
by fp32 rounding (a near-tie of random data, within ~1e-7 relative) may be ordered differently by the two.
Exact ties (equal rows, integer-valued inputs) are ordered identically; tests/test_superlinear_search_triton.py
checks identity on random inputs, repeated k rows and small-integer inputs where most scores tie.

Memory traffic model (bytes requested from memory per query per stripe, no cache reuse assumed):
``D * size(k)`` for the key row ``t - d`` (bf16, D = 128: 256 B); per query once: ``D * size(q1)`` for q1
(256 B) and ``8 * num_spans`` for the anchors written (24 B at 3 spans), plus 4 B per stripe per *program* for
the distance (``BLOCK_T`` queries share it: 1/16 B per query at BLOCK_T = 64). Total for a call:
``B H L (S D size(k) + D size(q1) + 8 num_spans)`` with ``S`` the stripes (``S = sqrt(L) - sw_index`` at
``search_power`` 0.5; 512 at 256K): 16 heads, 256K tokens, d 128, bf16, 3 spans: 4.19M queries x (512 x 256 +
256 + 24) B = 551 GB requested, i.e. ``achieved GB/s = 551 / seconds`` for that case (the k rows of a block at
neighbouring distances overlap, and blocks of neighbouring queries read neighbouring rows, so part of it may be
served by L1/L2: the figure is what the kernel asks for, not DRAM traffic). The PyTorch search moves four
fp32 ``[B, H, L - d, D]`` transfers per stripe (read q1 and k, write their product, read it back for the sum):
~16 D B per query per stripe (2 KB at d 128), plus the running top-k's temporaries every 16 stripes. No speed is claimed here: not yet timed on a GPU.

Resources (compiled offline for sm_90a with the JIT's specialisation, methods/triton_fit.py ``compile_launch``
and ``ptxas_usage``; bf16 inputs, the defaults ``BLOCK_T`` = 64, 8 warps): registers per thread 98 at d 128 and
3 spans (80 at 1 span, 128 at 8 spans; 128 / 170 at d 256 with 3 / 8 spans), no spills, 0.5-2 KB of shared
memory (the reductions' scratch). At 4 warps the same tile needs 186 registers at d 128 (255 at d 256), and 128
queries at 4 warps spill 248 B per thread: hence 8 warps. The defaults are chosen from these counts, not timed.

``fault`` (tests only, default ``None``): ``off_by_one`` scores the key row ``t - d + 1`` (masked to the
sequence), ``no_topk_order`` stores the set unsorted (slot j = the set's column j), ``late_ties`` lets a later
stripe displace an equal score (``>=``): deliberately broken variants the identity tests must catch. Kernels
are decorated on first use, once per interpreter mode (linear_triton.jit_kernel); CUDA or ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear.linear_triton import interpreting, jit_kernel
from .superlinear import TRITON_MAX_SPANS

BLOCK_T = 64  # queries per program
BLOCK_D = 128  # head-dim columns per register tile (wider head dims: chunks of this)
NUM_WARPS = 8  # registers, not speed: see the module docstring
MAX_SPANS = TRITON_MAX_SPANS  # the running set lives in registers
FAULTS = {None: 0, "off_by_one": 1, "no_topk_order": 2, "late_ties": 3}


def _search_src(Q1, K, DIST, OUT, L, H, NDIST,
                sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, ND: tl.constexpr, NSPAN: tl.constexpr,
                NS: tl.constexpr, FAULT: tl.constexpr, NDIST_INTERP: tl.constexpr):
    """Anchors ``OUT [B*H, L, NSPAN]`` (int64, contiguous) of the queries ``pid_t * BT ..`` of head ``pid_bh``."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q1 + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    t = pid_t * BT + tl.arange(0, BT)  # int32: L < 2^31
    tmask = t < L
    cols = tl.arange(0, BD)
    slot = tl.arange(0, NS)
    if ND == 1:  # the whole head dim in one register tile, loaded once
        cmask = cols < D
        q = tl.load(q_base + t[:, None].to(tl.int64) * sqt + cols[None, :] * sqd,
                    mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    # the running set: scores (padding columns +inf: never the worst), anchors (empty slots -1 - j: distinct)
    best_s = tl.where(slot[None, :] < NSPAN, float("-inf"), float("inf")) + tl.zeros([BT, NS], dtype=tl.float32)
    best_a = (-1 - slot)[None, :] + tl.zeros([BT, NS], dtype=tl.int32)
    # NDIST_INTERP > 0 in the interpreter only (a constexpr loop bound: it cannot take a runtime int argument's
    # value as one, as linear_triton's NSEG_INTERP)
    for i in range(0, NDIST_INTERP if NDIST_INTERP > 0 else NDIST):
        dist = tl.load(DIST + i)
        src = t - dist
        if FAULT == 1:  # negative control: the key one row later
            src = src + 1
        valid = tmask & (src >= 0) & (src < L)
        src64 = src.to(tl.int64)
        if ND == 1:
            kk = tl.load(k_base + src64[:, None] * skt + cols[None, :] * skd,
                         mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            score = tl.sum(q * kk, axis=1)
        else:  # wide head dims: chunk by chunk, q1 re-read (from cache) per stripe
            score = tl.zeros([BT], dtype=tl.float32)
            for c in tl.static_range(ND):
                cc = c * BD + cols
                cm = cc < D
                qc = tl.load(q_base + t[:, None].to(tl.int64) * sqt + cc[None, :] * sqd,
                             mask=tmask[:, None] & cm[None, :], other=0.0).to(tl.float32)
                kc = tl.load(k_base + src64[:, None] * skt + cc[None, :] * skd,
                             mask=valid[:, None] & cm[None, :], other=0.0).to(tl.float32)
                score += tl.sum(qc * kc, axis=1)
        score = tl.where(valid, score, float("-inf"))
        anchor = t - dist
        # the set's worst entry: lowest score, then smallest anchor (largest distance); unique (distinct anchors)
        worst_s = tl.min(best_s, axis=1)
        tied = best_s == worst_s[:, None]
        worst_a = tl.min(tl.where(tied, best_a, 2147483647), axis=1)
        is_worst = tied & (best_a == worst_a[:, None])
        if FAULT == 3:  # negative control: a later stripe displaces an equal score
            take = valid & (score >= worst_s)
        else:
            take = score > worst_s  # invalid stripes score -inf: never taken
        put = is_worst & take[:, None]
        best_s = tl.where(put, score[:, None], best_s)
        best_a = tl.where(put, anchor[:, None], best_a)
    # rank of each entry under (score desc, anchor desc) among the NSPAN real columns
    if FAULT == 2:  # negative control: the set as it lies, unsorted
        rank = slot[None, :] + tl.zeros([BT, NS], dtype=tl.int32)
    else:
        si = best_s[:, :, None]  # entry j (the one ranked) along axis 1, entry i (compared with) along axis 2
        ai = best_a[:, :, None]
        sj = best_s[:, None, :]
        aj = best_a[:, None, :]
        before = ((sj > si) | ((sj == si) & (aj > ai))) & (slot[None, None, :] < NSPAN)
        rank = tl.sum(before.to(tl.int32), axis=2)
    out_a = tl.where(best_a >= 0, best_a, -1).to(tl.int64)
    out_ptr = OUT + (pid_bh.to(tl.int64) * L + t[:, None].to(tl.int64)) * NSPAN + rank
    tl.store(out_ptr, out_a, mask=tmask[:, None] & (slot[None, :] < NSPAN))


def search(q1: torch.Tensor, k: torch.Tensor, distances: torch.Tensor, num_spans: int, *, block_t: int = BLOCK_T,
           block_d: int = BLOCK_D, num_warps: int = NUM_WARPS, fault: str | None = None) -> torch.Tensor:
    """:func:`superlinear.search` by the kernel: anchors ``[B, H, L, num_spans]`` int64 (-1 invalid), best first.
    ``q1``, ``k`` ``[B, H, L, D]`` (any strides, any float dtype; not differentiated), ``distances`` the stripe
    distances as an int32 tensor on their device (ascending, as ``stripe_distances`` gives them). CUDA or
    ``TRITON_INTERPRET=1``."""
    if fault not in FAULTS:
        raise ValueError(f"superlinear_search_triton.search: fault must be one of {list(FAULTS)}, got {fault!r}")
    if not 1 <= num_spans <= MAX_SPANS:
        raise ValueError(f"superlinear_search_triton.search: num_spans must be in 1..{MAX_SPANS}, got {num_spans}")
    if q1.dim() != 4 or q1.shape != k.shape:
        raise ValueError(f"superlinear_search_triton.search: q1 and k must be [B, H, L, D] of one shape, got "
                         f"{tuple(q1.shape)} and {tuple(k.shape)}")
    if distances.dtype != torch.int32 or distances.dim() != 1 or distances.device != q1.device:
        raise ValueError("superlinear_search_triton.search: distances must be a 1-d int32 tensor on q1's device")
    batch, heads, length, dim = q1.shape
    if length >= 2**31 - 1:
        raise ValueError("superlinear_search_triton.search: lengths below 2^31 only (int32 positions)")
    q1, k = q1.detach(), k.detach()
    out = torch.empty((batch, heads, length, num_spans), dtype=torch.long, device=q1.device)
    if out.numel() == 0:
        return out
    bd = min(block_d, max(16, triton.next_power_of_2(dim)))
    grid = (triton.cdiv(length, block_t), batch * heads)
    jit_kernel(_search_src)[grid](
        q1, k, distances, out, length, heads, distances.numel(), *q1.stride(), *k.stride(),
        D=dim, BT=block_t, BD=bd, ND=triton.cdiv(dim, bd), NSPAN=num_spans,
        NS=max(2, triton.next_power_of_2(num_spans)), FAULT=FAULTS[fault],
        NDIST_INTERP=distances.numel() if interpreting() else 0, num_warps=num_warps)
    return out
