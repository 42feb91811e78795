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
from ..fitting import fits_length, pow2_divisor
from ..registry import Capabilities, Unsupported, register_method
from .common import (SDPA_BACKENDS, Options, flex_path, from_tiles, overlapping_windows, pattern_reference,
                     sdpa_tiles, sdpa_windows, static_block_mask, to_tiles)

IMPLS = ("strided", "strided_square", "gather", "flex")


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


def halo_1d_strided(q, k, v, block, halo, causal, mask_padding, square=False, backend="auto"):
    """Zero-copy gather-dense: the key/value windows of all interior blocks are ONE overlapping strided view
    each (:func:`common.overlapping_windows`: ``[B*H, n, block + halo (+ halo), D]``, stride ``block * D``
    along blocks), the queries a plain view ``[B*H, n, block, D]``; one SDPA call sees the blocks as its heads
    axis. Without ``mask_padding`` the keys are zero-padded once (O(L*D)) and every block is interior; with it
    the few edge blocks whose window crosses an end (``ceil(halo / block)`` per end) run as small separate
    calls on their clipped windows.

    Causal: block ``b`` (first row ``s``) sees keys ``[s - halo, s + i]`` for its row ``i``: bottom-right
    causal attention on the ``[block, block + halo]`` tile (``causal_lower_right``: flash or memory-efficient;
    PyTorch gives cuDNN no bottom-right alignment). ``square=True`` instead widens the QUERY tile to the
    window too (an overlapping view of q, left-padded when the keys are) and runs plain square causal
    attention on ``[block + halo, block + halo]`` tiles (top-left = bottom-right, so cuDNN takes it), keeping
    each tile's last ``block`` output rows: the first ``halo`` rows are computed and dropped (their
    triangle, ``halo^2 / 2`` pairs per block, is wasted work; their gradient is exactly zero).

    Strides (torch 2.11 source, ``aten/.../transformers/cuda/sdp_utils.cpp``, ``cudnn/MHA.cpp``, flash
    ``mha_fwd``/``mha_bwd``, ``bias.py``): backend selection only asks the last dim to have stride 1
    (``check_last_dim_stride_equals_1_dense``; ``check_cudnn_layout`` exists but is not among cuDNN's
    constraints) and, for memory-efficient, storage offsets aligned to 16 bytes (ours are multiples of
    ``D`` elements). None of the three forward paths calls ``.contiguous()`` on q/k/v: flash passes
    batch/head/row strides to its kernel, memory-efficient likewise, cuDNN builds its graph from
    ``q/k/v.strides()`` (cached per stride pattern). The backward allocates dq/dk/dv with ``empty_like``,
    which for an overlapping view is a fresh contiguous tensor (never aliased), and cuDNN makes only
    ``grad_out`` match ``out``'s layout. So no silent copy of the windows - but whether cuDNN's engines
    ACCEPT a head stride smaller than ``seq * D`` is decided at graph build on the GPU: unverified here;
    ``method_options.halo.backend`` pins one backend if ``auto`` errors or is slow."""
    batch, heads, seq, dim = q.shape
    n = seq // block
    right = 0 if causal else halo
    width = block + halo + right
    rect = "lower_right" if causal else None
    if not mask_padding:
        k = F.pad(k, (0, 0, halo, right))
        v = F.pad(v, (0, 0, halo, right))
        shift, first, last = halo, 0, n
    else:
        shift = 0
        edge = -(-halo // block)  # blocks whose window crosses an edge
        first = min(edge, n)
        last = n if causal else max(first, n - edge)
    outs = []
    for i in range(first):  # edge blocks (mask_padding only): clipped windows
        outs.append(_edge_block(q, k, v, i, block, halo, causal, square, backend))
    if last > first:
        m = last - first
        kw = overlapping_windows(k, first * block - halo + shift, m, width, block)
        vw = overlapping_windows(v, first * block - halo + shift, m, width, block)
        if causal and square and halo:
            qp = q if mask_padding else F.pad(q, (0, 0, halo, 0))
            qw = overlapping_windows(qp, first * block - halo + shift, m, width, block)
            out = sdpa_windows(qw, kw, vw, "square", backend)[:, :, halo:]
        else:
            qw = q.reshape(batch * heads, seq, dim)[:, first * block:last * block].unflatten(1, (m, block))
            out = sdpa_windows(qw, kw, vw, ("square" if causal else None) if halo == 0 else rect, backend)
        outs.append(out.reshape(batch, heads, m * block, dim))
    for i in range(last, n):
        outs.append(_edge_block(q, k, v, i, block, halo, causal, square, backend))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _edge_block(q, k, v, i, block, halo, causal, square, backend):
    """One block whose window crosses an end (mask_padding): SDPA on its clipped window."""
    seq, s = q.shape[2], i * block
    lo, hi = max(0, s - halo), (s + block if causal else min(seq, s + block + halo))
    if causal and square:  # square causal on [lo, s + block), last `block` rows kept
        return sdpa_windows(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], "square", backend)[:, :, s - lo:]
    qb, kb, vb = q[:, :, s:s + block], k[:, :, lo:hi], v[:, :, lo:hi]
    return sdpa_windows(qb, kb, vb, "lower_right" if causal else None, backend)


def halo_1d_pairs(seq, block, halo, causal, mask_padding) -> int:
    rows = torch.arange(seq)
    lo, hi = window_1d(rows, block, halo, causal, seq)
    if mask_padding:
        lo, hi = lo.clamp_min(0), hi.clamp_max(seq)
    return int((hi - lo).sum())


BLOCK, HALO = 256, 128  # the 1-D form's defaults


def _fits(value, length: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= length and length % value == 0


@fits_length("halo")
def fit_halo(seq_q: int, seq_kv: int, causal: bool, given: dict) -> dict:
    """A default block longer than the sequence (or not dividing it): the largest power of two dividing the
    length with at least 4 blocks, halo half a block (the defaults' ratio)."""
    if _fits(given.get("block", BLOCK), seq_q) or "block" in given:
        return {}
    block = pow2_divisor(seq_q, seq_q / 4)
    return {"block": block, "halo": block // 2}


@register_method(
    "halo",
    Capabilities(family="local", exact=False, masks={"full", "causal"}, backward=True, compiled=True),
    description="HaloNet blocked local attention with halo, 1-D (impl: zero-copy strided windows through "
                "SDPA, copied windows, or FlexAttention)",
    options=("block", "halo", "mask_padding", "impl", "backend"),
)
def build_halo(ctx):
    """Options: ``block`` (256), ``halo`` (128), ``mask_padding`` (true), ``impl`` - ``strided`` (default:
    zero-copy overlapping window views through SDPA, causal as bottom-right tiles), ``strided_square``
    (the same, causal as square tiles that cuDNN takes, ``halo`` query rows per block wasted), ``gather``
    (each window copied, the former path), ``flex`` (compiled FlexAttention with a static BlockMask of the
    pattern); ``backend`` (``auto``, ``cudnn``, ``flash``, ``efficient``: the SDPA backend of the strided
    paths)."""
    case, causal = ctx.case, ctx.mask.causal
    opts = Options(ctx, "halo")
    block = opts.int("block", BLOCK, minimum=1)
    halo = opts.int("halo", HALO, minimum=0)
    mask_padding = opts.bool("mask_padding", True)
    impl = opts.choice("impl", "strided", IMPLS)
    backend = opts.choice("backend", "auto", SDPA_BACKENDS)
    if (backend in ("flash", "cudnn") and impl.startswith("strided") and torch.device(ctx.device).type == "cuda"
            and case.dtype == "float32"):  # SDPA's flash and cuDNN backends take fp16/bf16 on CUDA only
        opts.unfit("backend", f"{backend} takes float16/bfloat16 on CUDA, not float32 (auto or efficient run it)")
    if block > case.seq_q:
        opts.unfit("block", f"must be <= seq {case.seq_q}, got {block} (the case is shorter than one block)")
    if case.seq_q % block:
        raise Unsupported(f"seq {case.seq_q} is not a multiple of method_options.halo.block={block} "
                          "(lengths are not padded)")
    seq = case.seq_q

    if impl == "flex":
        attend = flex_path(ctx)
        pad = 0 if mask_padding else halo
        right = 0 if (causal or mask_padding) else halo

        def mask_mod(b, h, q_idx, kv_idx):
            lo, hi = window_1d(q_idx, block, halo, causal, seq)
            pos = kv_idx - pad
            return (pos >= lo) & (pos < hi)

        block_mask = static_block_mask(mask_mod, None, None, seq, seq + pad + right, ctx.device)

        def fn(q, k, v):
            if pad:
                k, v = F.pad(k, (0, 0, pad, right)), F.pad(v, (0, 0, pad, right))
            return attend(q, k, v, block_mask, False)
    elif impl == "gather":
        def fn(q, k, v):
            return halo_1d_fast(q, k, v, block, halo, causal, mask_padding)
    else:
        square = impl == "strided_square"

        def fn(q, k, v):
            return halo_1d_strided(q, k, v, block, halo, causal, mask_padding, square, backend)

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
    options=("block", "halo", "mask_padding"),
)
def build_halo_2d(ctx):
    case = ctx.case
    opts = Options(ctx, "halo_2d")
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
