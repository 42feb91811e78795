"""Long-Short Transformer (Zhu et al., NeurIPS 2021, arXiv:2107.02192), from CAB's efficient set
(``AttentionLS`` / ``CausalLS``).

Each query takes one softmax over a *short-term* part (keys of a local window) and a *long-term* part
(``rank`` keys made by a dynamic low-rank projection of the whole sequence):

- long-term: ``P = softmax over positions of (K W_p)`` (``W_p [D, rank]``, learned), ``K_bar = P^T K``,
  ``V_bar = P^T V`` - ``rank`` global keys and values that depend on the input;
- short-term, non-causal: the sequence in segments of ``window`` tokens; a segment's queries see their
  segment widened by ``window / 2`` on each side;
- causal (``CausalLS``, our reading of the paper's segment-wise form): the dynamic projection is made per
  segment (``rank`` keys from each segment's own tokens), a query sees the projected keys of strictly earlier
  segments only, and the keys of its own segment up to itself plus the whole previous segment.

Both are exact softmax attention over augmented keys ``[K ; K_bar]`` with a static pattern: the reference
writes the pattern out (masked softmax), the fast path is one compiled FlexAttention call with a static
BlockMask (a band plus a narrow column block). The paper's DualLN (separate LayerNorms on the two key sets)
belongs to the layer and is left out. Lengths must be a multiple of ``window``.

Options: ``window`` (default 256, even), ``rank`` (default 64), ``impl``:

- ``strided`` (default): the short-term part as window tiles - ONE zero-copy overlapping strided view of k
  and of v (``common.overlapping_windows``: ``[B*H, segments, 2 * window, D]``, stride ``window * D``),
  queries a plain view - through the flash kernel's own op (it returns the log-sum-exp SDPA drops; causal
  tiles are bottom-right ``[window, 2 * window]``), the long-term part through compiled FlexAttention with
  its log-sum-exp (non-causal: ``rank`` keys for every query; causal: the staircase over earlier segments'
  projected keys), merged exactly by log-sum-exp (``common.tiles_merged``: the backward runs the flash
  backward with the MERGED out and lse, the ring-attention identity, so gradients are exact too). The two
  edge segments of the non-causal form (clipped windows) run as their own small tiles.
- ``flex``: one compiled FlexAttention call over ``[K ; K_bar]`` with a static BlockMask (the former path).
"""
from __future__ import annotations

import torch

from ..contract import Prepared
from ..fitting import fits_length, pow2_divisor
from ..registry import Capabilities, Unsupported, register_method
from .common import (Options, flex_path, overlapping_windows, parameter, pattern_reference, static_block_mask,
                     tiles_merged)

IMPLS = ("strided", "flex")


def ls_strided(q, k, v, k_bar, v_bar, window, causal, attend, long_mask):
    """The ``strided`` fast path (module docstring): window tiles merged with the long-term part."""
    batch, heads, length, dim = q.shape
    n, half = length // window, window // 2
    if causal:  # segment 0 sees no projected keys; the rest see the staircase
        o_rest, lse_rest = attend(q[:, :, window:], k_bar, v_bar, long_mask, True) if n > 1 else (None, None)
        # zeros that stay in the graph (as they do in the flex form), so a window == seq case still has a
        # (zero) gradient for the projection parameter
        o_long = (v_bar[:, :, :1] * 0).expand(batch, heads, window, dim)
        lse_long = q.new_full((batch, heads, window), float("-inf"), dtype=torch.float32)
        if n > 1:
            o_long, lse_long = torch.cat([o_long, o_rest], 2), torch.cat([lse_long, lse_rest.float()], 2)
    else:
        o_long, lse_long = attend(q, k_bar, v_bar, long_mask, True)
    flat = lambda t: t.reshape(batch * heads, length, t.shape[-1])  # noqa: E731
    qf, of, lf = flat(q), flat(o_long), lse_long.reshape(batch * heads, length)

    def group(first, count, lo, width, causal_tile):
        """Segments first .. first + count - 1, keys of segment s: rows lo + (s - first) * window + width."""
        rows = slice(first * window, (first + count) * window)
        kw = overlapping_windows(k, lo, count, width, window)
        vw = overlapping_windows(v, lo, count, width, window)
        qw = qf[:, rows].unflatten(1, (count, window))
        out = tiles_merged(qw, kw, vw, of[:, rows].unflatten(1, (count, window)),
                           lf[:, rows].unflatten(1, (count, window)), causal_tile)
        return out.reshape(batch, heads, count * window, dim)

    if causal:
        parts = [group(0, 1, 0, window, True)]
        if n > 1:
            parts.append(group(1, n - 1, 0, 2 * window, True))
    elif n == 1:
        parts = [group(0, 1, 0, length, False)]
    else:
        parts = [group(0, 1, 0, min(length, window + half), False)]
        if n > 2:
            parts.append(group(1, n - 2, window - half, 2 * window, False))
        parts.append(group(n - 1, 1, (n - 1) * window - half, length - (n - 1) * window + half, False))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def projected(k, v, w_p, segment: int | None):
    """Dynamic projection: ``rank`` keys/values per sequence (``segment=None``) or per segment."""
    b, h, length, d = k.shape
    rank = w_p.shape[-1]
    if segment is None:
        p = torch.softmax(k @ w_p.to(k.dtype), dim=2)  # [B, H, L, r]: a distribution over positions
        return p.transpose(-1, -2) @ k, p.transpose(-1, -2) @ v
    n = length // segment
    ks, vs = k.reshape(b, h, n, segment, d), v.reshape(b, h, n, segment, v.shape[-1])
    p = torch.softmax(ks @ w_p.to(k.dtype), dim=3)  # [B, H, n, s, r]
    k_bar = (p.transpose(-1, -2) @ ks).reshape(b, h, n * rank, d)
    v_bar = (p.transpose(-1, -2) @ vs).reshape(b, h, n * rank, v.shape[-1])
    return k_bar, v_bar


def ls_visible(q_idx, kv_idx, length: int, window: int, rank: int, causal: bool):
    seg = q_idx // window
    local, glob = kv_idx < length, kv_idx >= length
    if causal:
        near = local & (kv_idx <= q_idx) & (kv_idx >= (seg - 1) * window)
        far = glob & ((kv_idx - length) // rank < seg)
    else:
        half = window // 2
        near = local & (kv_idx >= seg * window - half) & (kv_idx < (seg + 1) * window + half)
        far = glob
    return near | far


def ls_pairs_per_head(length: int, window: int, rank: int, causal: bool) -> int:
    """Visible pairs of :func:`ls_visible` for one head, counted per query row in O(L) (evaluating the
    pattern took seconds per 1K rows at 256K)."""
    q = torch.arange(length, dtype=torch.long)
    seg = q // window
    if causal:
        near = q - ((seg - 1) * window).clamp_min(0) + 1
        far = seg * rank
    else:
        half = window // 2
        near = ((seg + 1) * window + half).clamp_max(length) - (seg * window - half).clamp_min(0)
        far = torch.full_like(q, rank)
    return int((near + far).sum())


WINDOW, RANK = 256, 64  # the defaults


@fits_length("long_short")
def fit_long_short(seq_q: int, seq_kv: int, causal: bool, given: dict) -> dict:
    """A default window longer than the sequence (or not dividing it): the largest power of two dividing the
    length with at least 4 windows (and at least a set rank), rank half a window (the causal form needs rank <=
    window)."""
    window, rank = given.get("window", WINDOW), given.get("rank", RANK)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (window, rank)):
        return {}  # the builder names the bad value
    fitted = {}
    if "window" not in given and (window > seq_q or seq_q % window):
        window = max(2, pow2_divisor(seq_q, max(seq_q / 4, rank if "rank" in given else 0)))
        fitted["window"] = window
    if "rank" not in given and causal and rank > window:
        fitted["rank"] = max(1, window // 2)
    elif "rank" not in given and fitted:
        fitted["rank"] = min(rank, max(1, window // 2))
    return fitted


@register_method(
    "long_short",
    Capabilities(family="sparse", exact=False, masks={"full", "causal"}, backward=True, compiled=True,
                 trainable=True),
    description="Long-Short Transformer: local window + dynamic low-rank projection keys in one softmax "
                "(impl: zero-copy window tiles through flash merged with a FlexAttention long part, or one "
                "FlexAttention call over augmented keys)",
    options=("window", "rank", "impl"),
)
def build_long_short(ctx):
    case, causal = ctx.case, ctx.mask.causal
    opts = Options(ctx, "long_short")
    window = opts.int("window", WINDOW, minimum=2)
    rank = opts.int("rank", RANK, minimum=1)
    impl = opts.choice("impl", "strided", IMPLS)
    length, dim = case.seq_q, case.head_dim
    if window % 2:
        opts.fail("window", f"must be even (half a window on each side), got {window}")
    if causal and rank > window:
        opts.fail("rank", f"must be <= window ({window}) in the causal form (rank keys per segment), got {rank}")
    if window > length:
        opts.unfit("window", f"must be <= seq {length}, got {window} (the case is shorter than one window)")
    if length % window:
        raise Unsupported(f"seq {length} is not a multiple of method_options.long_short.window={window} "
                          "(lengths are not padded)")
    segment = window if causal else None
    extra = (length // window) * rank if causal else rank
    w_p = parameter(ctx, "long_short.wp", (dim, rank), dim ** -0.5)
    attend = flex_path(ctx)

    def mask_mod(b, h, q_idx, kv_idx):
        return ls_visible(q_idx, kv_idx, length, window, rank, causal)

    if impl == "flex":
        block_mask = static_block_mask(mask_mod, None, None, length, length + extra, ctx.device)

        def fn(q, k, v):
            k_bar, v_bar = projected(k, v, w_p, segment)
            return attend(q, torch.cat([k, k_bar], 2), torch.cat([v, v_bar], 2), block_mask, False)
    else:
        def long_mod(b, h, q_idx, kv_idx):  # causal: rows from segment 1 on (q_idx 0 = row `window`)
            return (kv_idx // rank < q_idx // window + 1) if causal else (kv_idx >= 0)

        rows = length - window if causal else length
        long_mask = static_block_mask(long_mod, None, None, rows, extra, ctx.device) if rows else None

        def fn(q, k, v):
            k_bar, v_bar = projected(k, v, w_p, segment)
            return ls_strided(q, k, v, k_bar, v_bar, window, causal, attend, long_mask)

    def reference(q, k, v, rows=None):
        k_bar, v_bar = projected(k, v, w_p.float(), segment)
        keys = torch.arange(length + extra, device=q.device)
        return pattern_reference(q, torch.cat([k, k_bar], 2), torch.cat([v, v_bar], 2),
                                 lambda idx: ls_visible(idx[:, None], keys[None, :], length, window, rank,
                                                        causal)[None, None], rows)

    pairs = ls_pairs_per_head(length, window, rank, causal) * case.batch * case.heads_q
    return Prepared(fn=fn, reference=reference, parameters=[w_p], attended_pairs=lambda q, k, v: pairs)
