"""Combiner: full attention support at sparse cost (Ren et al., NeurIPS 2021, arXiv:2107.05768;
methods-spec §4). Fixed, Axial and Logsparse factorisations, each a registered method.

Every query takes **one joint softmax** over direct logits (keys of a local support) and span logits (one
per span of the rest of its support): span key ``k_bar = max-pool of the span's keys``, span value
``v_bar = sum_j softmax_j(tau q_bar . k_j) v_j`` with ``q_bar = max-pool of the span's queries`` (query-
independent, computed once per span; ``tau = 1/sqrt(D)`` on every logit). So Combiner is exact softmax
attention over an *augmented* key set ``[K ; span keys]`` with a static pattern - which is how both the
references (pattern over the augmented keys, masked softmax) and the fast paths are written.

- ``combiner_fixed`` (Combiner-Fixed, ``_SelfAttSqrtn``): segments of ``segment`` tokens (default ~sqrt(L)).
  Causal: direct = own segment up to the query; spans = every earlier segment. Non-causal: direct = own
  segment; spans = every segment's summary (the own one too, as the reference code keeps it).
  Fast path ``impl=sdpa``: the segments as dense tiles (a view, no copy) and the summaries as a
  small dense part (causal: square causal along the grid's columns), each a flash/readable kernel call with
  its log-sum-exp, merged exactly (``common.parts_merged``). ``impl=flex`` (default, the measured one): one compiled FlexAttention call
  over ``[K ; K_bar]`` with a static BlockMask (block-diagonal local part plus a narrow summary column band).
- ``combiner_axial`` (Combiner-Axial, row-major): the sequence as ``L/s`` rows of ``s`` columns. Step 1: full
  attention inside each row gives ``row_out[r, c]``, and ``key_row[r, c] = W2 LN(k[r, c] + W1 row_out[r, c])``
  (learned ``W1, W2 [D, D]``; the paper's layer uses x where this kernel form has k). Step 2: query (r, c)
  takes one softmax over its row's keys (causal: c' <= c) and the other rows at its column (causal: rows
  r' < r; non-causal: r' != r) with keys ``key_row`` and values ``row_out``. Fast path: step 1 as SDPA row
  tiles; step 2 with ``impl=sdpa`` as dense kernel calls on row tiles and column tiles (views;
  rows r' < r square causal on shifted columns, non-causal rows r' > r the same on reversed columns) merged
  exactly by log-sum-exp (``common.parts_merged``); ``impl=flex``: two FlexAttention parts (row tiles;
  column tiles after a transpose) merged exactly by log-sum-exp.
- ``combiner_logsparse`` (Combiner-Logsparse, causal only): direct = the query itself; spans = the dyadic
  blocks that partition its prefix (level l, block size 2^l: block ``c = floor(i / 2^l) - 1`` iff c >= 0 and
  even). Fast path: per level, summaries by reshape + max/softmax, and the query's span looked up by a shifted
  broadcast (no gather): O(L log L d) in plain PyTorch. Needs a power-of-two length.

Options: ``segment`` (Fixed/Axial; default ``2^round(log2(L)/2)``; must divide L), ``impl`` (Fixed/Axial:
``flex`` default (the compiled-FlexAttention path the committed runs measured), ``sdpa`` the dense-tile
form, to be measured on a GPU before it becomes the default).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..registry import Capabilities, Unsupported, register_method
from .common import (Options, Place, flex_path, merge_parts, parameter, parts_merged, pattern_reference,
                     pow2_near_sqrt, sdpa_tiles, static_block_mask, to_tiles, from_tiles)

IMPLS = ("sdpa", "flex")
# flex stays the default until the sdpa form has run on a GPU (it calls the flash op directly, with stride-0 and
# transposed views that are checked on the CPU only); the committed runs measured flex
DEFAULT_IMPL = "flex"


def span_summaries(q, k, v, span: int):
    """Span keys and values of consecutive spans of ``span`` tokens: ``k_bar = max-pool(k)``,
    ``v_bar = sum_j softmax_j(tau max-pool(q) . k_j) v_j``; ``[B, H, L / span, D]`` each."""
    b, h, length, d = k.shape
    ks = k.reshape(b, h, length // span, span, d)
    qs = q.reshape(b, h, length // span, span, d)
    k_bar = ks.amax(dim=3)
    q_bar = qs.amax(dim=3)
    weights = torch.softmax(torch.einsum("bhnd,bhnjd->bhnj", q_bar, ks) / math.sqrt(d), dim=-1)
    v_bar = torch.einsum("bhnj,bhnjd->bhnd", weights, v.reshape(b, h, length // span, span, v.shape[-1]))
    return k_bar, v_bar


def _segment(opts: Options, seq: int) -> int:
    segment = opts.int("segment", None, minimum=1, allow_none=True) or pow2_near_sqrt(seq)
    if segment > seq:
        opts.unfit("segment", f"must be <= seq {seq}, got {segment} (the case is shorter than one segment)")
    if seq % segment:
        raise Unsupported(f"seq {seq} is not a multiple of method_options.{opts.method}.segment={segment} "
                          "(lengths are not padded)")
    return segment


# ---- Combiner-Fixed --------------------------------------------------------------------------------------------
def fixed_visible(q_idx, kv_idx, length: int, segment: int, causal: bool):
    """The Fixed pattern over ``[K (length) ; K_bar (length / segment)]`` (broadcasting index tensors)."""
    seg_q = q_idx // segment
    direct = (kv_idx < length) & (kv_idx // segment == seg_q)
    span = kv_idx >= length
    if causal:
        direct = direct & (kv_idx <= q_idx)
        span = span & (kv_idx - length < seg_q)
    return direct | span


def fixed_sdpa(q, k, v, segment: int, causal: bool):
    """Combiner-Fixed as dense kernel calls merged exactly by log-sum-exp (:func:`common.parts_merged`):
    the direct part is block-diagonal - the segments as tiles ``[B*H, n, segment, D]`` (a view of q, k, v, no
    copy; square causal when causal); the span part is small and dense: non-causal, every query against all
    ``n`` summaries (``[B*H, 1, L, D]`` x ``[B*H, 1, n, D]``); causal, segment ``s`` sees summaries ``< s``,
    which is square causal attention along the grid's COLUMNS (query column tiles ``[B*H, segment, n - 1, D]``
    of segments 1..n-1, a transposed view of q, against summaries 0..n-2 broadcast over the columns, stride 0).
    Every query reaches its direct part, so no merged row is empty."""
    batch, heads, length, dim = q.shape
    n = length // segment
    k_bar, v_bar = span_summaries(q, k, v, segment)
    k_bar = k_bar.reshape(batch * heads, 1, n, dim)
    v_bar = v_bar.reshape(batch * heads, 1, n, v.shape[-1]).contiguous()
    local = Place(n, segment)
    parts = [(local, local.take(q), local.take(k), local.take(v), causal)]
    if not causal:
        whole = Place(1, length)
        parts.append((whole, whole.take(q), k_bar, v_bar, False))
    elif n > 1:
        later = Place(n, segment, rows=slice(1, None), columns=True)
        spread = (batch * heads, segment, n - 1)
        parts.append((later, later.take(q), k_bar[:, :, :-1].expand(*spread, dim),
                      v_bar[:, :, :-1].expand(*spread, v.shape[-1]), True))
    return parts_merged(parts, (batch, heads, length))


@register_method(
    "combiner_fixed",
    Capabilities(family="sparse", exact=False, masks={"full", "causal"}, backward=True, compiled=True),
    description="Combiner-Fixed: own segment direct + every other segment as one span (max-pool key, "
                "attention-pooled value), one joint softmax (impl sdpa: dense segment tiles + summary part "
                "merged by log-sum-exp; impl flex: FlexAttention over augmented keys)",
    options=("segment", "impl"),
)
def build_combiner_fixed(ctx):
    case, causal = ctx.case, ctx.mask.causal
    opts = Options(ctx, "combiner_fixed")
    length = case.seq_q
    impl = opts.choice("impl", DEFAULT_IMPL, IMPLS)
    segment = _segment(opts, length)
    n_seg = length // segment

    if impl == "sdpa":
        def fn(q, k, v):
            return fixed_sdpa(q, k, v, segment, causal)
    else:
        attend = flex_path(ctx)

        def mask_mod(b, h, q_idx, kv_idx):
            return fixed_visible(q_idx, kv_idx, length, segment, causal)

        block_mask = static_block_mask(mask_mod, None, None, length, length + n_seg, ctx.device)

        def fn(q, k, v):
            k_bar, v_bar = span_summaries(q, k, v, segment)
            return attend(q, torch.cat([k, k_bar], dim=2), torch.cat([v, v_bar], dim=2), block_mask, False)

    def reference(q, k, v, rows=None):
        k_bar, v_bar = span_summaries(q, k, v, segment)
        keys = torch.arange(length + n_seg, device=q.device)
        return pattern_reference(q, torch.cat([k, k_bar], 2), torch.cat([v, v_bar], 2),
                                 lambda idx: fixed_visible(idx[:, None], keys[None, :], length, segment, causal)[None, None],
                                 rows)

    if causal:
        per_head = n_seg * segment * (segment + 1) // 2 + segment * n_seg * (n_seg - 1) // 2
    else:
        per_head = length * (segment + n_seg)
    pairs = per_head * case.batch * case.heads_q
    return Prepared(fn=fn, reference=reference, attended_pairs=lambda q, k, v: pairs)


# ---- Combiner-Axial ----------------------------------------------------------------------------------------------
def axial_rows(q, k, v, w1, w2, segment: int, row_attend):
    """Step 1: ``row_out`` (full attention inside each row) and ``key_row = W2 LN(k + W1 row_out)``."""
    heads = q.shape[1]
    row_out = from_tiles(row_attend(to_tiles(q, segment), to_tiles(k, segment), to_tiles(v, segment)), heads)
    hidden = k + row_out @ w1.to(k.dtype)
    key_row = F.layer_norm(hidden, hidden.shape[-1:]) @ w2.to(k.dtype)
    return row_out, key_row


def axial_visible(q_idx, kv_idx, length: int, segment: int, causal: bool):
    """Step 2's pattern over ``[K (length) ; key_row (length)]``."""
    row_q, col_q = q_idx // segment, q_idx % segment
    direct = (kv_idx < length) & (kv_idx // segment == row_q)
    other = kv_idx - length
    span = (kv_idx >= length) & (other % segment == col_q)
    if causal:
        direct = direct & (kv_idx <= q_idx)
        span = span & (other // segment < row_q)
    else:
        span = span & (other // segment != row_q)
    return direct | span


def _dense_rows(q, k, v, tiles_per_chunk: int = 1024):
    """Full softmax attention inside each row tile, written out (tiles in chunks to bound memory)."""
    outs = []
    for start in range(0, q.shape[1], tiles_per_chunk):
        sl = slice(start, start + tiles_per_chunk)
        scores = torch.matmul(q[:, sl], k[:, sl].transpose(-1, -2)) / math.sqrt(q.shape[-1])
        outs.append(torch.softmax(scores, dim=-1) @ v[:, sl])
    return torch.cat(outs, dim=1)


def axial_step2_sdpa(q, k, v, key_row, row_out, segment: int, causal: bool):
    """Step 2 as dense kernel calls merged exactly by log-sum-exp (:func:`common.parts_merged`): the own row
    as row tiles ``[B*H, n, segment, D]`` (views of q, k, v; square causal when causal); the other rows at
    the query's column as column tiles (transposed views): rows ``r' < r`` are square causal attention of the
    columns of rows 1..n-1 on those of rows 0..n-2 (``key_row``/``row_out``); non-causal adds rows ``r' > r``
    as the same on the columns in reverse row order (rows 0..n-2 against rows 1..n-1, flipped: three copies
    of ``L x D``). No kernel sees a masked-out block."""
    batch, heads, length, _ = q.shape
    n = length // segment
    local = Place(n, segment)
    parts = [(local, local.take(q), local.take(k), local.take(v), causal)]
    if n > 1:
        late, early = Place(n, segment, slice(1, None), True), Place(n, segment, slice(0, -1), True)
        parts.append((late, late.take(q), early.take(key_row), early.take(row_out), True))
        if not causal:
            back_q = Place(n, segment, slice(0, -1), True, flip=True)
            back_k = Place(n, segment, slice(1, None), True, flip=True)
            parts.append((back_q, back_q.take(q), back_k.take(key_row), back_k.take(row_out), True))
    return parts_merged(parts, (batch, heads, length))


@register_method(
    "combiner_axial",
    Capabilities(family="sparse", exact=False, masks={"full", "causal"}, backward=True, compiled=True,
                 trainable=True),
    description="Combiner-Axial (row-major): row attention summaries as keys/values of previous rows at the "
                "same column, one joint softmax (impl sdpa: row and column tiles as dense kernel calls merged by "
                "log-sum-exp; impl flex: SDPA rows + two FlexAttention parts)",
    options=("segment", "impl"),
)
def build_combiner_axial(ctx):
    case, causal = ctx.case, ctx.mask.causal
    opts = Options(ctx, "combiner_axial")
    length, dim = case.seq_q, case.head_dim
    impl = opts.choice("impl", DEFAULT_IMPL, IMPLS)
    segment = _segment(opts, length)
    n_rows = length // segment
    attend = flex_path(ctx) if impl == "flex" else None
    w1 = parameter(ctx, "combiner.axial.w1", (dim, dim), dim ** -0.5)
    w2 = parameter(ctx, "combiner.axial.w2", (dim, dim), dim ** -0.5)

    def local_mod(b, h, q_idx, kv_idx):  # inside a row
        return (kv_idx <= q_idx) if causal else (kv_idx >= 0)

    def column_mod(b, h, q_idx, kv_idx):  # along a column: rows
        return (kv_idx < q_idx) if causal else (kv_idx != q_idx)

    heads = case.heads_q
    if impl == "flex":
        local_mask = static_block_mask(local_mod, None, None, segment, segment, ctx.device)
        column_mask = static_block_mask(column_mod, None, None, n_rows, n_rows, ctx.device)

    def columns(t):  # [B, H, L, D] -> [B, H * s, L / s, D]: one tile per column, rows in order
        b, h, _, d = t.shape
        return t.reshape(b, h, n_rows, segment, d).transpose(2, 3).reshape(b, h * segment, n_rows, d)

    def from_columns(t, batch):
        return t.reshape(batch, heads, segment, n_rows, -1).transpose(2, 3).reshape(batch, heads, length, -1)

    def fn_sdpa(q, k, v):
        row_out, key_row = axial_rows(q, k, v, w1, w2, segment, sdpa_tiles)
        return axial_step2_sdpa(q, k, v, key_row, row_out, segment, causal)

    def fn(q, k, v):
        row_out, key_row = axial_rows(q, k, v, w1, w2, segment, sdpa_tiles)
        batch = q.shape[0]
        out_local, lse_local = attend(to_tiles(q, segment), to_tiles(k, segment), to_tiles(v, segment),
                                      local_mask, True)
        out_col, lse_col = attend(columns(q), columns(key_row), columns(row_out), column_mask, True)
        parts = [(from_tiles(out_local, heads), lse_local.reshape(batch, heads, length)),
                 (from_columns(out_col, batch), from_columns(lse_col[..., None], batch)[..., 0])]
        return merge_parts(parts)

    def reference(q, k, v, rows=None):
        row_out, key_row = axial_rows(q, k, v, w1.float(), w2.float(), segment, _dense_rows)
        keys = torch.arange(2 * length, device=q.device)
        return pattern_reference(q, torch.cat([k, key_row], 2), torch.cat([v, row_out], 2),
                                 lambda idx: axial_visible(idx[:, None], keys[None, :], length, segment, causal)[None, None],
                                 rows)

    if causal:
        step2 = n_rows * segment * (segment + 1) // 2 + segment * n_rows * (n_rows - 1) // 2
    else:
        step2 = length * (segment + n_rows - 1)
    pairs = (length * segment + step2) * case.batch * heads
    return Prepared(fn=fn_sdpa if impl == "sdpa" else fn, reference=reference, parameters=[w1, w2],
                    attended_pairs=lambda q, k, v: pairs)


# ---- Combiner-Logsparse ----------------------------------------------------------------------------------------
def dyadic_levels(length: int) -> int:
    return max(1, int(math.log2(length)))


def logsparse_fast(q, k, v):
    """Joint softmax over [self ; one span per level], per level by a shifted broadcast of the summaries.
    Computes in fp32 (summaries, logits, softmax and the level-by-level sum) and casts once at the end: in
    bf16 the log2(L) + 1 rounded partial sums drifted to the gate's tolerance (H200, 4K dk 0.0137)."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    b, h, length, d = q.shape
    scale = 1.0 / math.sqrt(d)
    logits = [(q * k).sum(-1) * scale]  # the query itself
    values = []
    for level in range(dyadic_levels(length)):
        size = 2 ** level
        n = length // size
        if level == 0:
            k_bar, v_bar = k, v
        else:
            k_bar, v_bar = span_summaries(q, k, v, size)
        # query block n uses span block n - 1 when n - 1 is even and >= 0
        k_prev = F.pad(k_bar, (0, 0, 1, 0))[:, :, :n]
        v_prev = F.pad(v_bar, (0, 0, 1, 0))[:, :, :n]
        blocks = torch.arange(n, device=q.device)
        valid = (blocks >= 1) & ((blocks - 1) % 2 == 0)
        logit = torch.einsum("bhnjd,bhnd->bhnj", q.reshape(b, h, n, size, d), k_prev) * scale
        logit = logit.masked_fill(~valid[:, None], float("-inf")).reshape(b, h, length)
        logits.append(logit)
        values.append(v_prev)
    probs = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # self always valid
    out = probs[..., 0:1] * v
    for level, v_prev in enumerate(values):
        size = 2 ** level
        n = length // size
        p = probs[..., level + 1].reshape(b, h, n, size, 1)
        out = out + (p * v_prev[:, :, :, None, :]).reshape(b, h, length, -1)
    return out.to(dtype)


def logsparse_reference(q, k, v, rows=None):
    """Masked softmax over the augmented keys ``[k ; level-1 summaries ; level-2 ; ...]`` with the dyadic
    pattern written out (level 0's spans are the raw keys, and the query's own key is its direct support)."""
    length = q.shape[2]
    keys, vals, level_of, block_of = [k], [v], [torch.zeros(length, dtype=torch.long)], [torch.arange(length)]
    for level in range(1, dyadic_levels(length)):
        k_bar, v_bar = span_summaries(q, k, v, 2 ** level)
        keys.append(k_bar)
        vals.append(v_bar)
        level_of.append(torch.full((k_bar.shape[2],), level))
        block_of.append(torch.arange(k_bar.shape[2]))
    level_of = torch.cat(level_of).to(q.device)
    block_of = torch.cat(block_of).to(q.device)

    def allowed(idx):
        wanted = idx[:, None] // 2 ** level_of[None, :] - 1
        span = (block_of[None, :] == wanted) & (wanted >= 0) & (wanted % 2 == 0)
        own = (level_of[None, :] == 0) & (block_of[None, :] == idx[:, None])
        return (span | own)[None, None]

    return pattern_reference(q, torch.cat(keys, 2), torch.cat(vals, 2), allowed, rows)


@register_method(
    "combiner_logsparse",
    Capabilities(family="sparse", exact=False, masks={"causal"}, causal_only=True, backward=True),
    description="Combiner-Logsparse: the prefix as dyadic spans (log2 L + 1 logits per query), one joint "
                "softmax (per-level shifted broadcasts, plain PyTorch)",
    options=(),
)
def build_combiner_logsparse(ctx):
    case = ctx.case
    Options(ctx, "combiner_logsparse")
    if not ctx.mask.causal:
        raise Unsupported("Combiner-Logsparse decomposes the causal prefix; non-causal masks are not defined")
    length = case.seq_q
    if length & (length - 1):
        raise Unsupported(f"the dyadic decomposition needs a power-of-two length, got seq {length}")
    rows = torch.arange(length)
    spans = sum(((rows // 2 ** level - 1 >= 0) & ((rows // 2 ** level - 1) % 2 == 0)).long()
                for level in range(dyadic_levels(length)))
    pairs = int((spans + 1).sum()) * case.batch * case.heads_q
    return Prepared(fn=logsparse_fast, reference=logsparse_reference, attended_pairs=lambda q, k, v: pairs)
