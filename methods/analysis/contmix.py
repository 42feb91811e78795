"""ContMix (OverLoCK, Lou & Yu, CVPR 2025, arXiv:2502.20087; methods-spec-3 §3) as a sequence layer: our 1-D
adaptation (causal and full) and the 2-D form for image tasks, written from the spec's reading of the operator
(nothing taken from LMMMEng/OverLoCK).

Read as attention: neighbourhood attention whose logits come from *region keys*. With G groups (= heads),
queries ``q = x W_q`` (per group, scaled by 1/√d), region centroids ``k̄_r = mean_{j ∈ region r}(x_j) W_k``
(R regions, default 49: adaptive average pooling), affinities ``a_{n,r} = ⟨q_n, k̄_r⟩``, window logits
``ℓ_{n,s} = Σ_r W_p[r, s]·a_{n,r} + b_s + rpb[g, offset(n, s)]`` (W_p shared by groups and positions), a
softmax over the window slots, and the values ``v = x W_v`` of the window: channels split in two halves, the
first aggregated over a small window (``kernel_small``, 5), the second over a large one (``kernel_large``, 13);
then ``W_o``. Neighbours' content enters only through the values; the query picks window offsets from global
context.

* Full mask, 1-D: window ``[start(n), start(n)+K)`` with ``start(n) = clamp(n − K//2, 0, L − K)`` (windows shift
  inward at the borders, NATTEN's rule); regions by adaptive average pooling.
* Causal (our extension): window ``[n − K + 1, n]`` (slots before 0 are dropped from the softmax), and region
  keys from the past only: region r's key for query n is the mean of its tokens ``<= n`` (all of them once the
  region is complete), or, for a region that has not started, the running prefix mean of tokens ``0..n``.
* 2-D (full mask, when the task passes ``options["grid"] = (height, width)``): K×K windows with NATTEN's border
  rule per axis, ``r×r`` regions (r = ⌊√R⌋) by 2-D adaptive pooling, relative-position bias per (Δh, Δw).

Fast path: region keys by pooling (full) or prefix sums (causal: ``a_{n,r}`` from q·P at three indices, no
[L, R, d] tensor), window values by one gather. Reference: region means and window sums written out (a loop
over regions with local cumulative sums, a loop over window slots). Class N. Hyper-parameters: ``regions``,
``kernel_small``, ``kernel_large``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..fitting import fits_length
from ..registry import Capabilities, Unsupported, register_method
from .common import ParamMaker, mask_mode, param_int, self_only


def region_bounds(length: int, regions: int):
    """Adaptive-pooling bounds: region r covers ``[floor(r·L/R), ceil((r+1)·L/R))``."""
    starts = [(r * length) // regions for r in range(regions)]
    ends = [-(-((r + 1) * length) // regions) for r in range(regions)]
    return starts, ends


class RegionMean:
    """Adaptive average pooling of one axis into ``regions`` (bounds of :func:`region_bounds`), without
    ``F.adaptive_avg_pool*d``: its CUDA backward fails an internal assert at long lengths (H200, contmix1d full
    fwd_bwd at 16K: "AdaptiveAveragePooling.cu:708"). A length that divides into the regions is a reshape and a
    mean; any other length a matmul by the fixed ``[regions, length]`` averaging matrix (overlapping edge
    tokens weighted in each region they belong to, as adaptive pooling does), built once here."""

    def __init__(self, length: int, regions: int):
        self.length, self.regions = length, regions
        self.matrix = None
        if length % regions:
            starts, ends = region_bounds(length, regions)
            j = torch.arange(length)[None, :]
            s, e = torch.tensor(starts)[:, None], torch.tensor(ends)[:, None]
            inside = (j >= s) & (j < e)
            self.matrix = inside.double() / (e - s).double()  # [R, L] (CPU, fp64 master), rows sum to 1
        self._cast = {}  # (device, dtype) -> the matrix there (made on the first call, the untimed warm-up)

    def __call__(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Mean over each region of axis ``dim`` of ``x`` (size ``length``) -> that axis of size ``regions``."""
        moved = x.movedim(dim, -2)  # [..., L, C]
        if self.matrix is None:
            pooled = moved.reshape(*moved.shape[:-2], self.regions, self.length // self.regions,
                                   moved.shape[-1]).mean(-2)
        else:
            key = (moved.device, moved.dtype)
            if key not in self._cast:
                self._cast[key] = self.matrix.to(device=moved.device, dtype=moved.dtype)
            pooled = self._cast[key] @ moved
        return pooled.movedim(-2, dim)


def windows_1d(length: int, kernel: int, causal: bool, device):
    """(index [L, K] (clamped), relative-bias index [L, K], valid [L, K])."""
    n = torch.arange(length, device=device)[:, None]
    s = torch.arange(kernel, device=device)[None, :]
    if causal:
        index = n - kernel + 1 + s
        rel = s.expand(length, kernel)  # offset index - n in [-K+1, 0] -> 0..K-1
        valid = index >= 0
    else:
        start = (n - kernel // 2).clamp(0, length - kernel)
        index = start + s
        rel = index - n + kernel - 1  # 0 .. 2K-2
        valid = torch.ones_like(index, dtype=torch.bool)
    return index.clamp_min(0), rel, valid


def windows_2d(height: int, width: int, kernel: int, device):
    """K×K windows on a grid (NATTEN border rule per axis): index [L, K²], relative index [L, K²] into (2K−1)²."""
    h = torch.arange(height, device=device).repeat_interleave(width)[:, None]
    w = torch.arange(width, device=device).repeat(height)[:, None]
    a = torch.arange(kernel, device=device).repeat_interleave(kernel)[None, :]
    b = torch.arange(kernel, device=device).repeat(kernel)[None, :]
    sh = (h - kernel // 2).clamp(0, height - kernel) + a
    sw = (w - kernel // 2).clamp(0, width - kernel) + b
    index = sh * width + sw
    rel = (sh - h + kernel - 1) * (2 * kernel - 1) + (sw - w + kernel - 1)
    return index, rel, torch.ones_like(index, dtype=torch.bool)


def aggregate_fast(weights, values, index):
    """``Σ_s w[b,g,n,s] · values[b, index[n,s], g, :]``: one gather. values [B, L, G, c] -> [B, L, G, c]."""
    batch, length, groups, c = values.shape
    gathered = values[:, index.reshape(-1)].view(batch, length, index.shape[1], groups, c)
    return torch.einsum("bgns,bnsgc->bngc", weights, gathered)


def aggregate_reference(weights, values, index):
    out = torch.zeros_like(values)
    for s in range(index.shape[1]):
        out = out + weights[..., s].permute(0, 2, 1)[..., None] * values[:, index[:, s]]
    return out


REGIONS = 49  # the default (7 x 7 in the 2-D form)


@fits_length("contmix1d")
def fit_contmix1d(seq_q: int, seq_kv: int, causal: bool, given: dict) -> dict:
    """More default regions than the (1-D) sequence has tokens: a region per 4 tokens."""
    if "regions" in given or REGIONS <= seq_q:
        return {}
    return {"regions": max(1, seq_q // 4)}


@register_method("contmix1d", Capabilities(family="analysis", exact=False, form="layer", masks={"full", "causal"},
                                            backward=True, trainable=True),
                 options=("regions", "kernel_small", "kernel_large"))
def build_contmix1d(ctx):
    """ContMix: neighbourhood attention with logits from region keys (1-D causal/full; 2-D on a grid)."""
    causal, _ = mask_mode(ctx)
    self_only(ctx, "a self-attention token mixer")
    case = ctx.case
    length, groups, d = case.seq_q, case.heads_q, case.head_dim
    width = groups * d
    if width % (2 * groups):
        raise Unsupported(f"contmix1d splits heads_q*head_dim={width} into two halves of {groups} groups")
    grid = ctx.options.get("grid") if not causal else None
    regions = param_int(ctx, "regions", REGIONS)
    k_small = param_int(ctx, "kernel_small", 5)
    k_large = param_int(ctx, "kernel_large", 13)
    if grid is not None:
        height, gwidth = (int(g) for g in grid)
        if height * gwidth != length:
            raise ValueError(f"options.grid {grid} does not hold {length} positions")
        side = max(1, math.isqrt(regions))
        regions = side * side
        if max(k_small, k_large) > min(height, gwidth) or side > min(height, gwidth):
            raise Unsupported(f"contmix1d (2-D): kernels {k_small}/{k_large} and {side}x{side} regions need a grid of "
                              f"at least that size, got {height}x{gwidth}")
        wins = [windows_2d(height, gwidth, k, ctx.device) for k in (k_small, k_large)]
        rel_sizes = [(2 * k - 1) ** 2 for k in (k_small, k_large)]
    else:
        if regions > length:
            raise Unsupported(f"contmix1d: {regions} regions need at least that many tokens, got {length}")
        if not causal and max(k_small, k_large) > length:
            raise Unsupported(f"contmix1d: a window of {max(k_small, k_large)} needs that many tokens, got {length}")
        wins = [windows_1d(length, k, causal, ctx.device) for k in (k_small, k_large)]
        rel_sizes = [(k if causal else 2 * k - 1) for k in (k_small, k_large)]
    slots = [w[0].shape[1] for w in wins]
    make = ParamMaker(case.seed, ctx.device)
    w_q = make.randn(width, width, std=width ** -0.5)
    w_k = make.randn(width, width, std=width ** -0.5)
    w_p = make.randn(regions, sum(slots), std=regions ** -0.5)
    b_p = make.const(sum(slots), value=0.0)
    rpb = [make.const(groups, n, value=0.0) for n in rel_sizes]
    w_v = make.randn(width, width, std=width ** -0.5)
    w_o = make.randn(width, width, std=width ** -0.5)
    if grid is not None:
        pool_rows, pool_cols = RegionMean(height, side), RegionMean(gwidth, side)
    elif not causal:
        pool = RegionMean(length, regions)
    starts, ends = region_bounds(length, regions)
    s_idx = torch.tensor(starts, device=ctx.device)
    e_idx = torch.tensor(ends, device=ctx.device)

    def queries(x):
        return (x @ w_q.to(x.dtype)).view(x.shape[0], length, groups, d).transpose(1, 2) * d ** -0.5  # [B,G,L,d]

    def keys(x):
        return (x @ w_k.to(x.dtype)).view(x.shape[0], length, groups, d).transpose(1, 2)  # [B,G,L,d]

    def affinity_fast(x):
        q = queries(x)
        if grid is not None:
            # rectangles: the mean over rows of the column means (adaptive 2-D pooling is separable)
            pooled = pool_cols(pool_rows(x.view(x.shape[0], height, gwidth, width), 1), 2)  # [B, r, r, C]
            kbar = (pooled.reshape(x.shape[0], regions, width) @ w_k.to(x.dtype)).view(x.shape[0], regions, groups, d)
            return torch.einsum("bgnd,brgd->bgnr", q, kbar)
        if not causal:
            pooled = pool(x, 1)  # [B, R, C]
            kbar = (pooled @ w_k.to(x.dtype)).view(x.shape[0], regions, groups, d)
            return torch.einsum("bgnd,brgd->bgnr", q, kbar)
        k = keys(x)
        prefix = F.pad(torch.cumsum(k, dim=2), (0, 0, 1, 0))  # P[m] = Σ_{j<m} k_j, [B,G,L+1,d]
        n = torch.arange(length, device=x.device)
        q_now = (q * prefix[:, :, 1:]).sum(-1)  # q_n · P[n+1]
        q_end = q @ prefix[:, :, e_idx].transpose(-1, -2)  # [B,G,L,R]
        q_start = q @ prefix[:, :, s_idx].transpose(-1, -2)
        done = (n[:, None] + 1) >= e_idx[None, :]
        top = torch.where(done, q_end, q_now[..., None]) - q_start
        count = (torch.minimum(e_idx[None, :], n[:, None] + 1) - s_idx[None, :]).clamp_min(1)
        started = s_idx[None, :] <= n[:, None]
        return torch.where(started, top / count, (q_now / (n + 1))[..., None])

    def affinity_reference(x):
        q = queries(x)
        k = keys(x) if grid is None else None
        cols = []
        n = torch.arange(length, device=x.device)
        for r in range(regions):
            if grid is not None:
                rh, rw = divmod(r, side)
                h0, h1 = (rh * height) // side, -(-((rh + 1) * height) // side)
                c0, c1 = (rw * gwidth) // side, -(-((rw + 1) * gwidth) // side)
                xs = x.view(x.shape[0], height, gwidth, width)[:, h0:h1, c0:c1].reshape(x.shape[0], -1, width)
                kbar = (xs.mean(1) @ w_k.to(x.dtype)).view(x.shape[0], groups, d)
                cols.append(torch.einsum("bgnd,bgd->bgn", q, kbar))
                continue
            s0, s1 = starts[r], ends[r]
            if not causal:
                kbar = k[:, :, s0:s1].mean(2)
                cols.append(torch.einsum("bgnd,bgd->bgn", q, kbar))
                continue
            local = torch.cumsum(k[:, :, s0:s1], dim=2) / torch.arange(1, s1 - s0 + 1, device=x.device)[:, None]
            before = torch.cumsum(k, dim=2) / (n + 1)[:, None]  # running prefix mean (region not started)
            parts = [before[:, :, :s0], local, local[:, :, -1:].expand(-1, -1, length - s1, -1)]
            cols.append((q * torch.cat(parts, dim=2)).sum(-1))
        return torch.stack(cols, dim=-1)

    def mix(x, affinity, aggregate):
        a = affinity(x)  # [B, G, L, R]
        logits = torch.einsum("bgnr,rs->bgns", a, w_p.to(x.dtype)) + b_p.to(x.dtype)
        v = (x @ w_v.to(x.dtype)).view(x.shape[0], length, 2, groups, width // (2 * groups))
        outs, offset = [], 0
        for half, ((index, rel, valid), table, n_slots) in enumerate(zip(wins, rpb, slots)):
            part = logits[..., offset:offset + n_slots] + table.to(x.dtype)[:, rel][None]
            part = part.masked_fill(~valid[None, None], float("-inf"))
            weights = torch.softmax(part, dim=-1)
            outs.append(aggregate(weights, v[:, :, half], index))
            offset += n_slots
        y = torch.cat([o.reshape(x.shape[0], length, -1) for o in outs], dim=-1)
        return y @ w_o.to(x.dtype)

    def fast(x):
        return mix(x.float(), affinity_fast, aggregate_fast).to(x.dtype)

    def reference(x):
        return mix(x, affinity_reference, aggregate_reference)

    flops = case.batch * length * (8.0 * width * width + 2.0 * width * regions + 2.0 * groups * regions * sum(slots)
                                   + 2.0 * (width // 2) * sum(slots))
    return Prepared(fn=fast, reference=reference, parameters=make.tensors, flops=flops, softmax_comparable=False)
