"""HaloNet-style blocked local attention with a halo (Vaswani et al., CVPR 2021, arXiv:2103.12731;
methods-spec §5).

Queries are cut into non-overlapping blocks; a block's queries attend to the keys of the block widened by a
``halo`` on each side (one softmax per query over that window). Exact softmax restricted to its own pattern
(class P: equal to full attention only when the window covers everything).

- ``halo`` (1-D): block ``[s, s + b)`` attends to ``[s - h, s + b + h)``; causal: ``[s - h, s + b)`` with
  token-causal order inside the own block.
- ``halo_2d``: a flattened square grid (``seq = side^2``); ``b x b`` query blocks attend to the
  ``(b + 2h) x (b + 2h)`` window centred on them.

Borders: ``mask_padding=true`` (default, as lucidrains' halonet-pytorch) clips windows at the sequence/grid
edge; ``false`` zero-pads keys and values there (timm's ``HaloAttn``: the zero keys take part in the softmax).
Relative position embeddings of the paper are not part of the kernel form (they belong to a model); left out.

Fast path (gather-dense): windows gathered with ``unfold`` into tiles ``[B, H * blocks, window, D]`` and run
through SDPA (cuDNN first; causal windows with a bottom-right causal tile mask); 1-D border blocks with
clipped windows run as their own small calls, 2-D border tiles with a key-validity mask. Lengths that are not
a multiple of the block are refused (``Unsupported``), never padded.

Options: ``block`` (1-D default 256, 2-D default 8), ``halo`` (1-D default 128, 2-D default 3; >= 0),
``mask_padding`` (default true).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..registry import Capabilities, Unsupported, register_method
from .common import Options, from_tiles, pattern_reference, sdpa_tiles, to_tiles


# ---- 1-D ------------------------------------------------------------------------------------------------------
def window_1d(rows: torch.Tensor, block: int, halo: int, causal: bool, seq: int):
    """Inclusive-exclusive key window ``[lo, hi)`` of each query row (unclipped)."""
    start = rows // block * block
    lo = start - halo
    hi = torch.minimum(rows + 1, start + block) if causal else start + block + halo
    return lo, hi


def halo_1d_reference(q, k, v, block, halo, causal, mask_padding, rows=None):
    """Masked softmax: query i sees keys in its block's window (zero-padded keys included when not
    ``mask_padding``: keys and values are padded with ``halo`` zeros on each side first)."""
    seq = q.shape[2]
    pad = 0 if mask_padding else halo
    if pad:
        k = F.pad(k, (0, 0, pad, pad))
        v = F.pad(v, (0, 0, pad, pad))
    keys = torch.arange(k.shape[2], device=q.device) - pad  # position of each (padded) key

    def allowed(idx):
        lo, hi = window_1d(idx, block, halo, causal, seq)
        return ((keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None]))[None, None]

    return pattern_reference(q, k, v, allowed, rows)


def halo_1d_fast(q, k, v, block, halo, causal, mask_padding):
    batch, heads, seq, dim = q.shape
    n = seq // block
    right = 0 if causal else halo
    if not mask_padding:
        k = F.pad(k, (0, 0, halo, right))
        v = F.pad(v, (0, 0, halo, right))
        lead = 0  # every block's window is inside the padded keys
        border = []
        interior = range(n)
        shift = halo
    else:
        shift = 0
        edge = -(-halo // block)  # blocks whose window crosses an edge
        first = min(edge, n)
        last = n if causal else max(first, n - edge)
        border = list(range(first)) + list(range(last, n))
        interior = range(first, last)
        lead = first
    outs = {}
    if len(interior):
        i0, i1 = interior.start, interior.stop
        width = block + halo + right
        lo = i0 * block - halo + shift
        kw = k[:, :, lo:lo + (i1 - i0 - 1) * block + width].unfold(2, width, block)  # [B, H, m, D, W]
        vw = v[:, :, lo:lo + (i1 - i0 - 1) * block + width].unfold(2, width, block)
        kw = kw.transpose(-1, -2).reshape(batch, heads * (i1 - i0), width, dim)
        vw = vw.transpose(-1, -2).reshape(batch, heads * (i1 - i0), width, dim)
        qt = to_tiles(q[:, :, i0 * block:i1 * block], block)
        out = sdpa_tiles(qt, kw, vw, causal="lower_right" if causal else None)
        outs[i0] = from_tiles(out, heads)
    for i in border:
        s = i * block
        lo, hi = max(0, s - halo), s + block if causal else min(seq, s + block + halo)
        out = sdpa_tiles(q[:, :, s:s + block], k[:, :, lo:hi], v[:, :, lo:hi],
                         causal="lower_right" if causal else None)
        outs[i] = out
    del lead
    return torch.cat([outs[key] for key in sorted(outs)], dim=2)


def halo_1d_pairs(seq, block, halo, causal, mask_padding) -> int:
    rows = torch.arange(seq)
    lo, hi = window_1d(rows, block, halo, causal, seq)
    if mask_padding:
        lo, hi = lo.clamp_min(0), hi.clamp_max(seq)
    return int((hi - lo).sum())


@register_method(
    "halo",
    Capabilities(family="local", exact=False, masks={"full", "causal"}, backward=True),
    description="HaloNet blocked local attention with halo, 1-D (gathered windows through SDPA)",
)
def build_halo(ctx):
    case, causal = ctx.case, ctx.mask.causal
    opts = Options(ctx, "halo", ("block", "halo", "mask_padding"))
    block = opts.int("block", 256, minimum=1)
    halo = opts.int("halo", 128, minimum=0)
    mask_padding = opts.bool("mask_padding", True)
    if block > case.seq_q:
        opts.fail("block", f"must be <= seq {case.seq_q}, got {block}")
    if case.seq_q % block:
        raise Unsupported(f"seq {case.seq_q} is not a multiple of method_options.halo.block={block} "
                          "(lengths are not padded)")

    def fn(q, k, v):
        return halo_1d_fast(q, k, v, block, halo, causal, mask_padding)

    def reference(q, k, v, rows=None):
        return halo_1d_reference(q, k, v, block, halo, causal, mask_padding, rows)

    pairs = halo_1d_pairs(case.seq_q, block, halo, causal, mask_padding) * case.batch * case.heads_q
    return Prepared(fn=fn, reference=reference, attended_pairs=lambda q, k, v: pairs)


# ---- 2-D ------------------------------------------------------------------------------------------------------
def halo_2d_reference(q, k, v, side, block, halo, mask_padding, rows=None):
    """Masked softmax on the grid: token (y, x) sees (y', x') inside its block's window; with zero padding the
    window's off-grid positions are zero keys/values that take part (appended after the grid tokens)."""
    device = q.device
    pos = torch.arange(side * side, device=device)
    ky, kx = pos // side, pos % side
    extra = 0
    if not mask_padding:
        # every off-grid position some window covers holds a zero key/value: append them
        big = side + 2 * halo
        grid = torch.arange(big * big, device=device)
        gy, gx = grid // big - halo, grid % big - halo
        off = (gy < 0) | (gy >= side) | (gx < 0) | (gx >= side)
        ky, kx = torch.cat([ky, gy[off]]), torch.cat([kx, gx[off]])
        extra = int(off.sum())
        k = F.pad(k, (0, 0, 0, extra))
        v = F.pad(v, (0, 0, 0, extra))

    def allowed(idx):
        by, bx = idx // side // block * block, idx % side // block * block
        inside_y = (ky[None, :] >= (by - halo)[:, None]) & (ky[None, :] < (by + block + halo)[:, None])
        inside_x = (kx[None, :] >= (bx - halo)[:, None]) & (kx[None, :] < (bx + block + halo)[:, None])
        return (inside_y & inside_x)[None, None]

    return pattern_reference(q, k, v, allowed, rows)


def halo_2d_fast(q, k, v, side, block, halo, mask_padding):
    batch, heads, seq, dim = q.shape
    nb, width = side // block, block + 2 * halo

    def windows(t):
        img = t.reshape(batch, heads, side, side, dim).permute(0, 1, 4, 2, 3)  # [B, H, D, side, side]
        img = F.pad(img, (halo, halo, halo, halo))
        win = img.unfold(3, width, block).unfold(4, width, block)  # [B, H, D, nb, nb, W, W]
        return win.permute(0, 1, 3, 4, 5, 6, 2).reshape(batch, heads * nb * nb, width * width, dim)

    def blocks(t):
        return t.reshape(batch, heads, nb, block, nb, block, dim).permute(0, 1, 2, 4, 3, 5, 6).reshape(
            batch, heads * nb * nb, block * block, dim)

    qt, kt, vt = blocks(q), windows(k), windows(v)
    if not mask_padding or halo == 0:
        out = sdpa_tiles(qt, kt, vt)
    else:
        valid = F.pad(torch.ones(1, 1, side, side, device=q.device), (halo,) * 4)
        valid = valid.unfold(2, width, block).unfold(3, width, block).reshape(nb * nb, width * width) > 0
        border = ~valid.all(dim=-1)  # [nb^2] tiles with off-grid keys
        tile_border = border.repeat(heads)  # tiles are head-major: index h * nb^2 + t
        out = torch.empty_like(qt)
        inner = (~tile_border).nonzero().squeeze(-1)
        outer = tile_border.nonzero().squeeze(-1)
        if inner.numel():
            out[:, inner] = sdpa_tiles(qt[:, inner], kt[:, inner], vt[:, inner])
        if outer.numel():
            mask = valid.repeat(heads, 1)[outer][None, :, None, :]  # [1, T_b, 1, W^2]
            out[:, outer] = F.scaled_dot_product_attention(qt[:, outer], kt[:, outer], vt[:, outer], attn_mask=mask)
    out = out.reshape(batch, heads, nb, nb, block, block, dim).permute(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(batch, heads, seq, dim)


@register_method(
    "halo_2d",
    Capabilities(family="local", exact=False, masks={"full"}, backward=True),
    description="HaloNet blocked local attention with halo on a square grid (seq = side^2), SDPA tiles",
)
def build_halo_2d(ctx):
    case = ctx.case
    opts = Options(ctx, "halo_2d", ("block", "halo", "mask_padding"))
    block = opts.int("block", 8, minimum=1)
    halo = opts.int("halo", 3, minimum=0)
    mask_padding = opts.bool("mask_padding", True)
    side = math.isqrt(case.seq_q)
    if side * side != case.seq_q:
        raise Unsupported(f"the 2-D form needs a square grid: seq={case.seq_q} is not a square")
    if side % block:
        raise Unsupported(f"grid side {side} is not a multiple of method_options.halo_2d.block={block}")

    def fn(q, k, v):
        return halo_2d_fast(q, k, v, side, block, halo, mask_padding)

    def reference(q, k, v, rows=None):
        return halo_2d_reference(q, k, v, side, block, halo, mask_padding, rows)

    span = torch.arange(0, side, block)
    if mask_padding:
        extent = ((span + block + halo).clamp_max(side) - (span - halo).clamp_min(0))
        per_block = int((extent[:, None] * extent[None, :]).sum())
    else:
        per_block = len(span) ** 2 * (block + 2 * halo) ** 2
    pairs = per_block * block * block * case.batch * case.heads_q
    return Prepared(fn=fn, reference=reference, attended_pairs=lambda q, k, v: pairs)
