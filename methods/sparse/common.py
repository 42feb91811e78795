"""Shared pieces of the routed, sparse and local methods (``methods/sparse``).

- **Options**: hyper-parameters come from ``method_options.<method>.<field>`` (``ctx.param``); every reader
  here validates its value and raises ``ValueError`` naming that path, so a bad config fails at build with the
  field in the message. Unknown fields are refused by the registry (a typo must not silently use a default). A valid
  value that does not fit the case (a block or region longer than the sequence, more regions than it holds)
  is :meth:`Options.unfit`: ``Unsupported`` naming the field, so the case is an ``unsupported`` row, not an
  error (the methods' defaults are sized for long sequences; a 128-token task is outside them).
- **Reference helpers**: :func:`masked_attention` is the readable masked softmax (fp32, in the dtype of its
  inputs) every method's reference ends in; :func:`row_chunks` keeps its memory bounded; references take an
  optional ``rows`` (query rows to compute) so the gate can check long cases on a sample of rows.
- **Fast-path primitives**: :func:`sdpa_tiles` runs SDPA (cuDNN first on CUDA) over gathered dense tiles in
  chunks the kernels' grid limits allow; :data:`FLEX` / :func:`flex_attend` runs compiled FlexAttention with a
  ``BlockMask`` and returns the log-sum-exp. ``dense_attend`` is the readable contract of the latter (used
  by the CPU tests in place of the compiled kernel, exactly as ``tests/test_flex_split.py`` does).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


# ---- options ------------------------------------------------------------------------------------------------
class Options:
    """Reads and validates ``method_options.<method>.*`` for one builder. Keys the method does not take are
    refused by the registry (its registration's ``options=``, checked when the config is planned and around
    every builder call: ``methods.registry.checked_builder``), not here."""

    def __init__(self, ctx, method: str):
        self.ctx, self.method = ctx, method

    def field(self, name: str) -> str:
        return f"method_options.{self.method}.{name}"

    def fail(self, name: str, message: str):
        """The value is invalid whatever the case (negative, wrong type, odd where even is needed)."""
        raise ValueError(f"{self.field(name)}: {message}")

    def unfit(self, name: str, message: str):
        """The value is valid but does not fit this case's shape (e.g. larger than the sequence): the case is
        outside what the method does with these options, an ``unsupported`` row whose reason names the field."""
        from ..registry import Unsupported

        raise Unsupported(f"{self.field(name)}: {message}")

    def int(self, name: str, default, minimum: int | None = None, maximum: int | None = None,
            allow_none: bool = False):
        value = self.ctx.param(name, default)
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(name, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be <= {maximum}, got {value}")
        return value

    def float(self, name: str, default, minimum: float | None = None, maximum: float | None = None,
              exclusive_min: bool = False):
        value = self.ctx.param(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(name, f"must be a finite number, got {value!r}")
        if minimum is not None and (value < minimum or (exclusive_min and value == minimum)):
            self.fail(name, f"must be {'>' if exclusive_min else '>='} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be <= {maximum}, got {value}")
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self.ctx.param(name, default)
        if not isinstance(value, bool):
            self.fail(name, f"must be true or false, got {value!r}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.ctx.param(name, default)
        if value not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value


def seeded(ctx, salt: str) -> torch.Generator:
    """A CPU generator seeded from the case's seed and a name (parameters are drawn on the CPU, then moved,
    so they are the same on every device)."""
    import zlib

    return torch.Generator().manual_seed((int(ctx.case.seed) * 1_000_003 + zlib.crc32(salt.encode())) % 2**63)


def parameter(ctx, salt: str, shape, scale: float, grad: bool = True) -> torch.Tensor:
    """A learnable parameter in fp32 on the case's device, drawn from N(0, scale^2) with a seeded generator."""
    t = torch.randn(tuple(shape), generator=seeded(ctx, salt)) * scale
    return t.to(ctx.device).requires_grad_(grad)


# ---- the readable reference --------------------------------------------------------------------------------
REF_BUDGET_ELEMS = 1 << 27
"""Elements of one chunk of a reference's temporaries (scores, masks): bounds memory at any length."""


def row_chunks(rows: torch.Tensor, per_row_elems: int, budget_elems: int | None = None):
    """Split the query-row index tensor ``rows`` into chunks of at most ``budget_elems / per_row_elems`` rows
    (``budget_elems`` default :data:`REF_BUDGET_ELEMS`)."""
    budget = REF_BUDGET_ELEMS if budget_elems is None else budget_elems
    step = max(1, budget // max(1, per_row_elems))
    for start in range(0, rows.numel(), step):
        yield rows[start:start + step]


def all_rows(seq_q: int, rows, device) -> torch.Tensor:
    return torch.arange(seq_q, device=device) if rows is None else rows.to(device)


def masked_attention(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Softmax attention of ``q_rows [B, H, R, D]`` over the keys ``allowed [.., R, Lk]`` (bool) lets each row
    see, written out: scores, masked, normalised, times values. A row that sees no key gives 0 (and no NaN in
    either direction). Computes in the dtype of its inputs."""
    scores = torch.matmul(q_rows, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, NEG_INF)
    top = scores.amax(dim=-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.matmul(weights, v) / total.clamp_min(torch.finfo(total.dtype).tiny)


def masked_attention_rows(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                          scale: float, budget_elems: int | None = None) -> torch.Tensor:
    """:func:`masked_attention`'s result (fp32 rounding aside) at the cost of the keys the rows see: forward
    only, for the ``rows=`` form of a reference (a sample of rows at a long length). Only the key columns at
    least one of the rows sees take part (gathered; a local or routed pattern's rows see a few hundred keys of
    a million), in key blocks with an exact two-pass softmax (``exact.reference.softmax_in_key_blocks``), so
    neither ``R x Lk`` scores nor K and V once per handful of rows are ever made: O(R x keys seen) work
    besides the mask itself."""
    from ..exact.reference import softmax_in_key_blocks

    budget = REF_BUDGET_ELEMS if budget_elems is None else budget_elems
    seq_kv = k.shape[2]
    seen = allowed.reshape(-1, seq_kv).any(dim=0)
    cols = seen.nonzero().squeeze(1)
    everything = cols.numel() == seq_kv
    if not everything:
        allowed = allowed.index_select(-1, cols)
    q_rows = q_rows.float()
    lead = torch.broadcast_shapes(q_rows.shape[:-1], allowed.shape[:-1])
    block = max(128, budget // max(1, 3 * lead.numel()))

    def take(t):
        def part(start, end):
            piece = t[:, :, start:end] if everything else t.index_select(2, cols[start:end])
            return piece.float()

        return part

    return softmax_in_key_blocks(q_rows, cols.numel(), take(k), take(v), lambda s, e: allowed[..., s:e], scale,
                                 block)


def pattern_reference(q, k, v, allowed_rows: Callable[[torch.Tensor], torch.Tensor], rows=None,
                      scale: float | None = None) -> torch.Tensor:
    """``masked_attention`` over the rows ``rows`` (all when None), chunked; ``allowed_rows(idx)`` gives the
    boolean pattern ``[B|1, H|1, len(idx), Lk]`` of the query rows ``idx``.

    The ``rows=`` form without autograd (what the gate runs on a long case's sampled rows) computes each
    chunk with :func:`masked_attention_rows` - the keys the chunk's rows see, in key blocks - and sizes the
    chunks by the pattern alone (``len(idx) x Lk`` booleans, times the pattern's own batch and head sizes):
    O(rows x Lk) for the pattern plus O(rows x keys seen) for the attention, where the written-out form costs
    O(rows x Lk x D) and reads K and V once per few rows (2 rows a chunk at 1M keys and 16 heads)."""
    batch, heads, seq_q, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    idx = all_rows(seq_q, rows, q.device)
    if rows is not None and not torch.is_grad_enabled() and idx.numel():
        per_row = allowed_rows(idx[:1]).shape[:-2].numel() * k.shape[2]
        outs = [masked_attention_rows(q[:, :, chunk], k, v, allowed_rows(chunk), scale)
                for chunk in row_chunks(idx, per_row)]
        return torch.cat(outs, dim=2).to(q.dtype)
    outs = [masked_attention(q[:, :, chunk], k, v, allowed_rows(chunk), scale)
            for chunk in row_chunks(idx, batch * heads * k.shape[2] * 3)]
    return torch.cat(outs, dim=2)


# ---- fast-path primitives ------------------------------------------------------------------------------------
MAX_TILES = 32768  # tiles per SDPA launch: kernels put the batch on a grid axis limited to 65535


def sdpa_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: str | None = None) -> torch.Tensor:
    """SDPA over tiles laid out ``[B, T, tq, D]`` x ``[B, T, tk, D]``: each tile is one batch entry of one head
    (``[B * T, 1, t, D]``, a free view for contiguous inputs), in launches of at most ``MAX_TILES`` tiles.
    ``causal``: None, ``"square"`` (tq == tk, top-left = bottom-right) or ``"lower_right"`` (query i of a tile
    sees keys up to i + tk - tq). On CUDA cuDNN is tried first, then flash, then memory-efficient
    (``lower_right`` runs flash or memory-efficient: PyTorch's API gives cuDNN no bottom-right alignment)."""
    batch, tiles = q.shape[:2]
    per = max(1, MAX_TILES // batch)
    parts = []
    for start in range(0, tiles, per):
        sl = slice(start, start + per)
        qs, ks, vs = q[:, sl], k[:, sl], v[:, sl]
        n = qs.shape[1]
        out = _sdpa(*(t.reshape(batch * n, 1, t.shape[-2], t.shape[-1]) for t in (qs, ks, vs)), causal)
        parts.append(out.reshape(batch, n, q.shape[-2], v.shape[-1]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _sdpa(q, k, v, causal, backend: str = "auto"):
    kwargs = {}
    if causal == "square":
        kwargs["is_causal"] = True
    elif causal == "lower_right":
        from torch.nn.attention.bias import causal_lower_right

        kwargs["attn_mask"] = causal_lower_right(q.shape[-2], k.shape[-2])
    elif causal is not None:
        raise ValueError(f"causal must be None, 'square' or 'lower_right', got {causal!r}")
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
             "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
             "efficient": [SDPBackend.EFFICIENT_ATTENTION]}[backend]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def flex_attend(q, k, v, block_mask, return_lse: bool = False):
    """FlexAttention (call it compiled): ``(out, lse)`` with ``return_lse`` (natural log, -inf on empty rows)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, return_lse=return_lse)


def dense_attend(q, k, v, block_mask, return_lse: bool = False):
    """The contract of :func:`flex_attend`, written out: masked softmax over ``block_mask.mask_mod``
    evaluated on every (batch, head, query, key) - for CPU tests and as documentation."""
    b = torch.arange(q.shape[0], device=q.device)[:, None, None, None]
    h = torch.arange(q.shape[1], device=q.device)[None, :, None, None]
    qi = torch.arange(q.shape[2], device=q.device)[None, None, :, None]
    ki = torch.arange(k.shape[2], device=q.device)[None, None, None, :]
    visible = block_mask.mask_mod(b, h, qi, ki).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = masked_attention(q, k, v, visible, scale)
    if not return_lse:
        return out
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~visible, NEG_INF)
    return out, torch.logsumexp(scores, dim=-1)


def block_visible(q, k, block_mask):
    """What a ``BlockMask`` lets each query see, written out: a key is visible in a *full* block listed for its
    query block whatever the mask_mod says, in a listed *partial* block where the mask_mod says so, and nowhere
    else. Returns ``(visible [B, H, Lq, Lk] bool, (b, h, q_idx, kv_idx))``, the index grids broadcastable to it
    (for a score_mod)."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    block_q, block_kv = block_mask.BLOCK_SIZE
    n_kv = -(-seq_kv // block_kv)

    def listed(counts, indices):  # [B|1, H|1, q_blocks, *] lists -> [B|1, H|1, seq_q, seq_kv] flags
        keep = torch.arange(indices.shape[-1], device=q.device) < counts[..., None]
        flags = torch.zeros(*indices.shape[:-1], n_kv + 1, dtype=torch.bool, device=q.device)
        flags.scatter_(-1, torch.where(keep, indices.long(), n_kv), True)
        flags = flags[..., :n_kv].repeat_interleave(block_q, dim=2)[:, :, :seq_q]
        return flags.repeat_interleave(block_kv, dim=3)[..., :seq_kv]

    partial = listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = torch.zeros_like(partial) if block_mask.full_kv_num_blocks is None else \
        listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    b = torch.arange(q.shape[0], device=q.device)[:, None, None, None]
    h = torch.arange(q.shape[1], device=q.device)[None, :, None, None]
    qi = torch.arange(seq_q, device=q.device)[None, None, :, None]
    ki = torch.arange(seq_kv, device=q.device)[None, None, None, :]
    visible = full | (partial & block_mask.mask_mod(b, h, qi, ki))
    return visible.expand(q.shape[0], q.shape[1], seq_q, seq_kv), (b, h, qi, ki)


def block_attend(q, k, v, block_mask, return_lse: bool = False):
    """The contract of :func:`flex_attend` with a real ``BlockMask``, written out block by block (CPU tests):
    :func:`block_visible` - so a wrong block list is caught even when the mask_mod alone is right (which
    :func:`dense_attend`, reading the mask_mod only, cannot see)."""
    visible, _ = block_visible(q, k, block_mask)
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = masked_attention(q, k, v, visible, scale)
    if not return_lse:
        return out
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~visible, NEG_INF)
    return out, torch.logsumexp(scores, dim=-1)


class DenseBlockMask:
    """What :func:`dense_attend` needs of a BlockMask: its ``mask_mod``."""

    def __init__(self, mask_mod):
        self.mask_mod = mask_mod


def merge_parts(parts) -> torch.Tensor:
    """Exact union of disjoint parts ``[(out, lse), ...]`` of one softmax (log-sum-exp weights, fp32)."""
    from ..exact.flex_split import merge

    return merge(parts)


def block_mask_from_mod(mask_mod, batch, heads, seq_q, seq_kv, device, block: int = 128,
                        budget_elems: int = 1 << 27):
    """A static ``BlockMask`` (built once per case, outside the timed region). For a mask_mod that ignores
    batch and head (``batch = heads = None``) it is built in query-block chunks of at most ``budget_elems``
    mask entries (:func:`block_flags_from_mod`): ``create_block_mask`` (not compiled) evaluates the whole
    ``[seq_q, seq_kv]`` mask at once - 64 GiB at 256K, which is how combiner_fixed and long_short ran out of
    memory at build on the H200."""
    if batch is not None or heads is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(mask_mod, batch, heads, seq_q, seq_kv, device=device, BLOCK_SIZE=block)
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = block_flags_from_mod(mask_mod, seq_q, seq_kv, device, block, budget_elems)

    def listed(flags):
        flags = flags[None, None]
        counts = flags.sum(dim=-1, dtype=torch.int32)
        order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts, order

    counts, order = listed(partial)
    full_counts, full_order = listed(full)
    return BlockMask.from_kv_blocks(counts, order, full_counts, full_order, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seq_q, seq_kv))


def block_flags_from_mod(mask_mod, seq_q: int, seq_kv: int, device, block: int = 128,
                         budget_elems: int = 1 << 27):
    """``(partial, full)`` block flags ``[ceil(seq_q / block), ceil(seq_kv / block)]`` of a batch- and
    head-independent ``mask_mod``, evaluated a few query blocks at a time (memory ~``budget_elems`` mask
    entries plus the mask_mod's temporaries, never ``seq_q * seq_kv``). Positions past the ends are not
    visible (a block holding them is partial, never full); the mask_mod sees clamped indices only."""
    q_blocks, kv_blocks = -(-seq_q // block), -(-seq_kv // block)
    keys = torch.arange(kv_blocks * block, device=device)
    key_ok = keys < seq_kv
    keys = keys.clamp_max(seq_kv - 1)
    zero = torch.zeros((), dtype=torch.long, device=device)
    step = max(1, budget_elems // (block * kv_blocks * block))
    partial = torch.empty(q_blocks, kv_blocks, dtype=torch.bool, device=device)
    full = torch.empty_like(partial)
    for first in range(0, q_blocks, step):
        last = min(q_blocks, first + step)
        rows = torch.arange(first * block, last * block, device=device)
        row_ok = rows < seq_q
        seen = mask_mod(zero, zero, rows.clamp_max(seq_q - 1)[:, None], keys[None, :])
        seen = (seen & row_ok[:, None] & key_ok[None, :]).view(last - first, block, kv_blocks, block)
        anywhere, everywhere = seen.any(dim=3).any(dim=1), seen.all(dim=3).all(dim=1)
        partial[first:last] = anywhere & ~everywhere
        full[first:last] = everywhere
    return partial, full


def block_mask_from_flags(touched: torch.Tensor, mask_mod, seq_q: int, seq_kv: int, block: int = 128):
    """A data-dependent ``BlockMask`` from a boolean ``touched [B, H, q_blocks, kv_blocks]`` (every touched
    block partial: the mask_mod decides inside it), through ``BlockMask.from_kv_blocks``."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = touched.sum(dim=-1, dtype=torch.int32)
    return BlockMask.from_kv_blocks(counts, touched_first(touched), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seq_q, seq_kv))


def touched_first(touched: torch.Tensor) -> torch.Tensor:
    """The key-block columns of each row, touched ones first, each group in column order (int32): what a stable
    ``argsort(~touched)`` gives, by two cumulative sums and one scatter (O(n), no sort: at 1M tokens a span's flags
    are ``[16, 1024, 8192]`` per chunk of query rows, sorted 24 times a call by superlinear before)."""
    flags = touched.to(torch.int32)
    before = flags.cumsum(dim=-1) - flags  # touched columns before this one
    counts = flags.sum(dim=-1, keepdim=True)
    columns = torch.arange(touched.shape[-1], device=touched.device, dtype=torch.int32).expand_as(flags)
    slot = torch.where(touched, before, counts + (columns - before))  # untouched: after every touched, in order
    return torch.empty_like(flags).scatter_(-1, slot.long(), columns)


def ranges_to_blocks(starts: torch.Tensor, ends: torch.Tensor, seq_kv: int, block: int, q_block: int = 128):
    """Union per query block of the inclusive key ranges ``[starts, ends]`` (``[B, H, Lq, n]``; empty when
    start > end) as block flags ``[B, H, ceil(Lq / q_block), ceil(Lk / block)]`` (a difference array)."""
    batch, heads, seq_q, n = starts.shape
    kv_blocks = -(-seq_kv // block)
    q_blocks = -(-seq_q // q_block)
    valid = starts <= ends
    first = torch.where(valid, starts // block, 0).long()
    last = torch.where(valid, ends // block + 1, 0).long()
    pad = q_blocks * q_block - seq_q
    if pad:
        first = F.pad(first, (0, 0, 0, pad))
        last = F.pad(last, (0, 0, 0, pad))
    diff = torch.zeros(batch, heads, q_blocks, kv_blocks + 1, dtype=torch.int32, device=starts.device)
    ones = torch.ones_like(first, dtype=torch.int32).view(batch, heads, q_blocks, q_block * n)
    diff.scatter_add_(3, first.view(batch, heads, q_blocks, q_block * n), ones)
    diff.scatter_add_(3, last.view(batch, heads, q_blocks, q_block * n), -ones)
    return diff.cumsum(dim=-1)[..., :kv_blocks] > 0


def to_tiles(t: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, H * (L / size), size, D]`` (a view: tiles in the heads axis)."""
    b, h, length, d = t.shape
    return t.reshape(b, h * (length // size), size, d)


def from_tiles(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, tiles, size, d = t.shape
    return t.reshape(b, heads, tiles // heads * size, d)


# ---- FlexAttention paths -------------------------------------------------------------------------------------
ATTEND = flex_attend  # the CPU tests swap in dense_attend (the same contract, written out)


def compiled_primitive(ctx, chosen, default, why: str):
    """``default`` (a FlexAttention primitive) compiled from a fresh dynamo cache for the case, or ``chosen`` when
    the tests swapped another in; ``Unsupported(why)`` off CUDA (compiled FlexAttention on the CPU has no
    backward and no log-sum-exp). Shared by :func:`flex_path` and nats_l's scored form."""
    from ..registry import Unsupported

    if chosen is not default:
        return chosen
    if ctx.device.type != "cuda":
        raise Unsupported(why)
    from ..exact.flex import allow_backward_replay, fresh_compile

    allow_backward_replay(ctx.case)
    return fresh_compile(default)


def flex_path(ctx):
    """The attention primitive of a FlexAttention fast path: ``attend(q, k, v, block_mask, return_lse)``,
    compiled from a fresh dynamo cache; on a device without a usable compiled FlexAttention the case is
    ``Unsupported`` - unless ``ATTEND`` was swapped (tests)."""
    return compiled_primitive(ctx, ATTEND, flex_attend, "the FlexAttention fast path runs on CUDA (compiled "
                              "FlexAttention on the CPU has no backward and no log-sum-exp)")


def static_block_mask(mask_mod, batch, heads, seq_q, seq_kv, device):
    """A BlockMask built once per case (outside the timed region); the mask_mod alone for a swapped primitive."""
    if ATTEND is not flex_attend:
        return DenseBlockMask(mask_mod)
    return block_mask_from_mod(mask_mod, batch, heads, seq_q, seq_kv, device)


def dynamic_block_mask(touched, mask_mod, seq_q, seq_kv, block: int = 128):
    """A BlockMask from data-dependent block flags (timed: part of the method); the mask_mod alone for a
    swapped primitive."""
    if ATTEND is not flex_attend:
        return DenseBlockMask(mask_mod)
    return block_mask_from_flags(touched, mask_mod, seq_q, seq_kv, block)


def pow2_near_sqrt(length: int) -> int:
    """``2^round(log2(L) / 2)``: the ~sqrt(L) default of segment sizes and cluster counts."""
    return 2 ** round(math.log2(max(length, 1)) / 2)


# ---- zero-copy overlapping windows (local methods' "strided" fast paths) -----------------------------------
class _Windows(torch.autograd.Function):
    """``flat [N, L, D]`` (contiguous) -> the overlapping view ``[N, count, width, D]`` whose window ``j`` is
    rows ``start + j * step ... + width`` (stride ``step * D`` along windows: no copy). Backward folds the
    window gradients back in ``ceil(width / step)`` non-overlapping strided adds (autograd's generic
    ``as_strided`` backward would scatter through index tensors over the whole storage)."""

    @staticmethod
    def forward(ctx, flat, start, count, width, step):
        n, length, dim = flat.shape
        ctx.meta = (n, length, dim, start, count, width, step)
        return flat.as_strided((n, count, width, dim), (length * dim, step * dim, dim, 1),
                               flat.storage_offset() + start * dim)

    @staticmethod
    def backward(ctx, grad):
        n, length, dim, start, count, width, step = ctx.meta
        room = start + (count + -(-width // step)) * step
        out = grad.new_zeros(n, max(length, room), dim)
        for c0 in range(0, width, step):
            c1 = min(width, c0 + step)
            out.narrow(1, start + c0, count * step).view(n, count, step, dim)[:, :, :c1 - c0].add_(grad[:, :, c0:c1])
        return out[:, :length], None, None, None, None


def overlapping_windows(t: torch.Tensor, start: int, count: int, width: int, step: int) -> torch.Tensor:
    """``t [B, H, L, D]`` -> ``[B * H, count, width, D]``: ``count`` windows of ``width`` rows, the first at row
    ``start``, one every ``step`` rows, as ONE strided view of ``t``'s storage (windows overlap when
    ``width > step``; nothing is copied for a contiguous ``t``). Gradients fold back exactly."""
    b, h, length, dim = t.shape
    if start < 0 or count < 1 or start + (count - 1) * step + width > length:
        raise ValueError(f"windows [{start} + j * {step}, + {width}) for j < {count} leave the {length} rows")
    flat = t.reshape(b * h, length, dim)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return _Windows.apply(flat, start, count, width, step)


def sdpa_windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: str | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """SDPA over window tiles laid out ``[N, T, tq, D]`` x ``[N, T, tk, D]`` passed AS IS: the tiles are SDPA's
    heads axis, so the overlapping strided views of :func:`overlapping_windows` reach the kernel without a
    copy (``sdpa_tiles`` instead folds tiles into the batch axis, which a reshape of an overlapping view can
    only do by copying). ``T`` is cut in launches of at most ``MAX_TILES``. ``causal`` as in
    :func:`sdpa_tiles`; ``backend``: ``auto`` (cuDNN, flash, memory-efficient in that order) or one of
    ``cudnn``, ``flash``, ``efficient`` alone (CUDA only; the CPU runs the math backend)."""
    tiles = q.shape[1]
    parts = [_sdpa(q[:, s:s + MAX_TILES], k[:, s:s + MAX_TILES], v[:, s:s + MAX_TILES], causal, backend)
             for s in range(0, tiles, MAX_TILES)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient")


# ---- window tiles merged exactly with another part (log-sum-exp), gradients included -------------------------
def tile_kernel_readable(op: str, *args):
    """The contract of :data:`TILE_KERNEL`, written out (CPU, fp32 cases, tests).
    ``("fwd", q, k, v, causal) -> (out, lse, state)``; ``("bwd", dout, q, k, v, out, lse, causal, state) ->
    (dq, dk, dv)`` (``state``: what the kernel's backward needs of its forward, here None),
    the kernels' backward: ``P = exp(S - lse)``, ``dS = P * (dout . v - rowsum(dout * out))`` - with the
    MERGED out and lse passed in, this is each part's exact share of the merged softmax's gradient (the
    ring-attention identity). ``causal``: bottom-right (query i of a [tq, tk] tile sees keys <= i + tk - tq)."""
    acc = torch.promote_types(args[1].dtype, torch.float32)  # fp32 at least (fp64 in the contract's test)

    def scores(q, k, causal):
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if causal:
            tq, tk = s.shape[-2:]
            keep = torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril(tk - tq)
            s = s.masked_fill(~keep, NEG_INF)
        return s

    if op == "fwd":
        q, k, v, causal = args
        s = scores(q, k, causal)
        lse = torch.logsumexp(s, dim=-1)
        return torch.matmul(torch.exp(s - lse[..., None]), v.to(acc)).to(q.dtype), lse, None
    dout, q, k, v, out, lse, causal, _ = args
    p = torch.exp(scores(q, k, causal) - lse[..., None].to(acc))
    dout = dout.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    ds = p * (torch.matmul(dout, v.to(acc).transpose(-1, -2)) - (dout * out.to(acc)).sum(-1, keepdim=True))
    scale = 1.0 / math.sqrt(q.shape[-1])
    dq = torch.matmul(ds, k.to(acc)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def tile_kernel_flash(op: str, *args):
    """:func:`tile_kernel_readable`'s contract through the flash kernels' own ops (CUDA, fp16/bf16): the
    forward returns the log-sum-exp SDPA drops, the backward takes out/lse from the caller. Flash's causal
    flag is bottom-right when ``tq != tk`` (what ``causal_lower_right`` relies on). Strides as in
    :func:`sdpa_windows` (overlapping window views pass uncopied)."""
    if op == "fwd":
        q, k, v, causal = args
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            return tile_kernel_readable(op, *args)
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
        return res[0], res[1], (res[2], res[3], res[6], res[7])
    dout, q, k, v, out, lse, causal, state = args
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return tile_kernel_readable(op, *args)
    cum_q, cum_k, seed, offset = state
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.contiguous(), q, k, v, out, lse.contiguous(), cum_q, cum_k, q.shape[-2], k.shape[-2], 0.0, causal,
        seed, offset)


TILE_KERNEL = tile_kernel_flash


class _TilesMerged(torch.autograd.Function):
    """Attention of window tiles ``q [N, T, tq, D]`` x ``k, v [N, T, tk, D]`` merged with another part of the
    same softmax, given as ``(o_other, lse_other)`` in the same tile layout (``lse_other`` fp32, ``-inf``
    where that part sees nothing): returns the merged output. Backward: the tiles' kernel backward with the
    merged out and lse (exact), and the other part's share ``w * dO`` (out) and ``w * dO . (o - out)`` (lse)."""

    @staticmethod
    def forward(ctx, q, k, v, o_other, lse_other, causal):
        kernel = TILE_KERNEL
        o_tile, lse_tile, state = kernel("fwd", q, k, v, causal)
        lse_tile = lse_tile.float()
        top = torch.maximum(lse_tile, lse_other)
        w_tile, w_other = torch.exp(lse_tile - top), torch.exp(lse_other - top)
        total = w_tile + w_other
        out = ((w_tile[..., None] * o_tile.float() + w_other[..., None] * o_other.float())
               / total[..., None]).to(q.dtype)
        lse = top + torch.log(total)
        ctx.save_for_backward(q, k, v, o_other, lse_other, out, lse)
        ctx.causal, ctx.kernel, ctx.state = causal, kernel, state
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o_other, lse_other, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel("bwd", dout, q, k, v, out, lse, ctx.causal, ctx.state)
        w_other = torch.exp(lse_other - lse)
        d_o_other = (w_other[..., None] * dout.float()).to(o_other.dtype)
        d_lse_other = w_other * (dout.float() * (o_other.float() - out.float())).sum(-1)
        return dq, dk, dv, d_o_other, d_lse_other, None


def tiles_merged(q, k, v, o_other, lse_other, causal: bool) -> torch.Tensor:
    """See :class:`_TilesMerged` (a window part merged exactly with another part by log-sum-exp)."""
    return _TilesMerged.apply(q, k, v, o_other, lse_other.float(), causal)


# ---- several kernel parts of one softmax merged exactly (log-sum-exp), gradients included ---------------------
class Place:
    """Where a kernel part's query tiles sit in the common ``[B, H, L, X]`` layout, seen as a row-major grid
    ``[B * H, n, size, X]`` (position = grid row * size + column): ``rows`` (a slice of grid rows),
    ``columns`` (the part's tiles are grid columns, ``[B * H, size, rows, X]``, a transposed view; else grid
    rows, ``[B * H, rows, size, X]``, a plain view), ``flip`` (the rows in reverse order - a copy; turns
    "later rows" into a causal pattern). ``Place(1, L)`` is the whole sequence as one tile."""

    def __init__(self, n: int, size: int, rows: slice = slice(None), columns: bool = False, flip: bool = False):
        self.n, self.size, self.rows, self.columns, self.flip = n, size, rows, columns, flip

    def _grid(self, t):
        return t.reshape(t.shape[0] * t.shape[1], self.n, self.size, t.shape[-1])[:, self.rows]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """``t [B, H, L, X]`` -> the part's layout."""
        g = self._grid(t)
        if self.flip:
            g = g.flip(1)
        return g.transpose(1, 2) if self.columns else g

    def put(self, common: torch.Tensor, part: torch.Tensor) -> None:
        """Write ``part`` (the part's layout) into its place in the contiguous ``common [B, H, L, X]``."""
        if self.columns:
            part = part.transpose(1, 2)
        if self.flip:
            part = part.flip(1)
        self._grid(common).copy_(part)


class _PartsMerged(torch.autograd.Function):
    """Disjoint kernel parts of one softmax, each ``(q_i, k_i, v_i)`` in its own tile layout ``[N, T, t, D]``
    with a causal flag (square or bottom-right, :func:`tile_kernel_readable`) and a :class:`Place` of its
    queries in the common ``[B, H, L, D]`` layout (rows a part does not reach get lse -inf from it; every row
    must be reached by some part). Forward: each part through :data:`TILE_KERNEL` (out and lse), merged by
    log-sum-exp in fp32. Backward: each part's kernel backward fed the MERGED out and lse (its exact share of
    the merged softmax's gradient, the ring-attention identity), so no part needs an lse gradient."""

    @staticmethod
    def forward(ctx, places, causals, shape, *qkv):
        kernel = TILE_KERNEL
        batch, heads, length = shape
        dv = qkv[2].shape[-1]
        n = len(places)
        outs = qkv[0].new_zeros(n, batch, heads, length, dv)
        lses = torch.full((n, batch, heads, length, 1), NEG_INF, dtype=torch.float32, device=qkv[0].device)
        states = []
        for i, (place, causal) in enumerate(zip(places, causals)):
            o, lse, state = kernel("fwd", *qkv[3 * i:3 * i + 3], causal)
            place.put(outs[i], o)
            place.put(lses[i], lse.float()[..., None])
            states.append(state)
        top = lses.amax(dim=0)
        weights = torch.exp(lses - top)
        total = weights.sum(dim=0)
        acc = weights[0] * outs[0].float()
        for i in range(1, n):
            acc.add_(weights[i] * outs[i].float())
        out = (acc / total).to(qkv[0].dtype)
        lse = top + torch.log(total)
        ctx.save_for_backward(*qkv, out, lse)
        ctx.places, ctx.causals, ctx.states, ctx.kernel = places, causals, states, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        *qkv, out, lse = ctx.saved_tensors
        grads = []
        for i, (place, causal) in enumerate(zip(ctx.places, ctx.causals)):
            grads.extend(ctx.kernel("bwd", place.take(dout), *qkv[3 * i:3 * i + 3], place.take(out),
                                    place.take(lse)[..., 0], causal, ctx.states[i]))
        return (None, None, None, *grads)


def parts_merged(parts, shape) -> torch.Tensor:
    """``parts``: ``[(place, q_i, k_i, v_i, causal), ...]`` (see :class:`_PartsMerged`); ``shape``: the common
    ``(B, H, L)``. Returns the merged output ``[B, H, L, Dv]``."""
    places = tuple(p[0] for p in parts)
    causals = tuple(bool(p[4]) for p in parts)
    flat = [t for p in parts for t in p[1:4]]
    return _PartsMerged.apply(places, causals, tuple(shape), *flat)
