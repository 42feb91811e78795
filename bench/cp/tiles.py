"""Each rank's shard of the mask against each KV chunk it meets, derived from the mask spec.

Nothing here is written per mask: a tile (a query shard against a KV chunk, each a list of segments of
original positions) is classified from the bound mask's own row counts — closed forms for interval,
relative and block-table masks (``masks.families``), a chunked evaluation of ``mask_mod`` otherwise:

* ``empty`` — no visible pair: the tile is skipped;
* ``full`` — every pair visible: no mask;
* ``causal`` — a square segment pair where local row i sees exactly local keys 0..i (top-left causal),
  which kernels with a native causal flag run without a mask;
* ``masked`` — anything else: the kernel gets the tile's own mask, as the mask's ``mask_mod`` evaluated at
  the tile's positions (a dense boolean for the math kernel, a position-mapped ``mask_mod`` for flex).

``plan_tile`` turns a tile into kernel calls: one call when the whole tile is full (or when the kernel
takes any mask), else one call per segment pair (consecutive full KV segments merged).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnbench.masks.families import BlockTableMask, PrefixTermsMask, RelativeMask

from .shard import Shard


class TileUnsupported(Exception):
    """The kernel cannot run a tile of this mask (e.g. a full/causal-only kernel meets a partial tile)."""


def visible_below(bound, rows: torch.Tensor, x) -> torch.Tensor:
    """Visible keys ``j < x`` for each query row in ``rows`` (int64 [n]); ``x`` an int or int64 [n]."""
    rows = rows.to(torch.int64)
    x = torch.as_tensor(x, dtype=torch.int64).expand_as(rows)
    if isinstance(bound, PrefixTermsMask):
        total = torch.zeros_like(rows)
        for limit, sign, g in bound.prefix_terms(rows):
            capped = torch.minimum(limit.expand_as(rows), x)
            total += sign * (g(capped) if g is not None else capped)
        return total
    if isinstance(bound, RelativeMask):
        lowest, at_most, _ = bound._distance_sums()
        position = rows + bound.offset
        return at_most[position - lowest] - at_most[position - x - lowest]
    if isinstance(bound, BlockTableMask):
        below = bound._visible_below(x)  # [mask-block rows, n]
        return below[rows // bound.mask_block, torch.arange(len(rows))]
    counts = torch.empty_like(rows)
    device = bound.device
    chunk = max(1, (1 << 22) // max(1, bound.seq_kv))
    kv = torch.arange(bound.seq_kv, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    for at in range(0, len(rows), chunk):
        part = rows[at: at + chunk].to(device)
        visible = bound.mask_mod(zero, zero, part[:, None], kv).expand(len(part), bound.seq_kv)
        limit = x[at: at + chunk, None].to(device)
        counts[at: at + chunk] = (visible & (kv < limit)).sum(dim=1).cpu()
    return counts


def pair_kind(bound, q_start: int, q_len: int, kv_start: int, kv_len: int) -> str:
    """empty, full, causal or masked: the (q segment, kv segment) block of ``bound``."""
    rows = torch.arange(q_start, q_start + q_len)
    lo = visible_below(bound, rows, kv_start)
    seen = visible_below(bound, rows, kv_start + kv_len) - lo
    total = int(seen.sum())
    if total == 0:
        return "empty"
    if total == q_len * kv_len:
        return "full"
    if q_len == kv_len:
        local = torch.arange(q_len)
        upto = visible_below(bound, rows, kv_start + local + 1) - lo
        if bool((upto == local + 1).all()) and bool((seen == upto).all()):
            return "causal"
    return "masked"


def _refine(segments, others):
    """``segments`` (local offset, start, length) cut at every start and end of ``others``."""
    cuts = sorted({p for _, start, length in others for p in (start, start + length)})
    out = []
    for offset, start, length in segments:
        points = [start] + [c for c in cuts if start < c < start + length] + [start + length]
        for a, b in zip(points[:-1], points[1:]):
            out.append((offset + a - start, a, b - a))
    return out


@dataclass
class Call:
    """One kernel call inside a tile: local query rows [q0, q1) against local keys [k0, k1).

    ``kind``: full, causal or masked; for masked calls ``q_pos`` / ``kv_pos`` are the original positions
    of the rows and keys (the kernel evaluates the mask there)."""

    q0: int
    q1: int
    k0: int
    k1: int
    kind: str
    q_pos: torch.Tensor | None = None
    kv_pos: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)  # the kernel's prepared mask (dense tensor, BlockMask), built once


@dataclass
class Tile:
    calls: list[Call]
    visible_pairs: int

    @property
    def empty(self) -> bool:
        return not self.calls


def plan_tile(bound, q_shard: Shard, kv_shard: Shard, any_mask: bool) -> Tile:
    """The kernel calls for ``q_shard`` against ``kv_shard``. ``any_mask``: the kernel takes a tile mask;
    otherwise a masked segment pair raises ``TileUnsupported``."""
    q_segs, kv_segs = q_shard.local_segments(), kv_shard.local_segments()
    if not any_mask:  # cut segments where the other side's segments start or end: diagonals become square
        q_segs, kv_segs = _refine(q_segs, kv_segs), _refine(kv_segs, q_segs)
    kinds = [[pair_kind(bound, qs, ql, ks, kl) for (_, ks, kl) in kv_segs] for (_, qs, ql) in q_segs]
    pairs = 0
    for (_, qs, ql), row in zip(q_segs, kinds):
        for (_, ks, kl), kind in zip(kv_segs, row):
            if kind == "full":
                pairs += ql * kl
            elif kind != "empty":
                rows = torch.arange(qs, qs + ql)
                pairs += int((visible_below(bound, rows, ks + kl) - visible_below(bound, rows, ks)).sum())
    flat = [k for row in kinds for k in row]
    if all(k == "empty" for k in flat):
        return Tile([], 0)
    lq, lk = q_shard.length, kv_shard.length
    if all(k == "full" for k in flat):
        return Tile([Call(0, lq, 0, lk, "full")], pairs)
    if any_mask:
        return Tile([Call(0, lq, 0, lk, "masked", q_shard.positions(), kv_shard.positions())], pairs)
    calls = []
    for (q_off, qs, ql), row in zip(q_segs, kinds):
        run = None  # [k0, k1) of consecutive full kv segments
        for (k_off, ks, kl), kind in zip(kv_segs, row):
            if kind == "full":
                if run is not None and run[1] == k_off:
                    run[1] = k_off + kl
                else:
                    if run is not None:
                        calls.append(Call(q_off, q_off + ql, run[0], run[1], "full"))
                    run = [k_off, k_off + kl]
                continue
            if run is not None:
                calls.append(Call(q_off, q_off + ql, run[0], run[1], "full"))
                run = None
            if kind == "causal":
                calls.append(Call(q_off, q_off + ql, k_off, k_off + kl, "causal"))
            elif kind == "masked":
                raise TileUnsupported(
                    f"mask {bound.label}: queries {qs}..{qs + ql - 1} against keys {ks}..{ks + kl - 1} are neither "
                    f"fully visible, empty nor causal; this kernel runs full and causal tiles only")
        if run is not None:
            calls.append(Call(q_off, q_off + ql, run[0], run[1], "full"))
    return Tile(calls, pairs)


class PositionMask:
    """A bound mask restricted to given query and key positions: the ``mask_mod`` of a tile, in local
    indices (what FlexAttention evaluates inside a CP tile)."""

    def __init__(self, bound, q_pos: torch.Tensor, kv_pos: torch.Tensor):
        self.bound, self.q_pos, self.kv_pos = bound, q_pos, kv_pos
        self.seq_q, self.seq_kv = len(q_pos), len(kv_pos)

    def to(self, device):
        return PositionMask(self.bound.to(device), self.q_pos.to(device), self.kv_pos.to(device))

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.bound.mask_mod(b, h, self.q_pos[q_idx], self.kv_pos[kv_idx])

    def dense(self, device=None) -> torch.Tensor:
        device = self.q_pos.device if device is None else device
        moved = self.to(device)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        visible = moved.bound.mask_mod(zero, zero, moved.q_pos[:, None], moved.kv_pos[None, :])
        return visible.expand(self.seq_q, self.seq_kv).to(torch.bool)


class RowSlice:
    """Rows [start, end) of a bound mask, all keys: what ``reference_attention`` needs for a slice of
    queries (the distributed fp32 reference)."""

    def __init__(self, bound, start: int, end: int):
        self.bound, self.start, self.end = bound, start, end
        self.seq_q, self.seq_kv = end - start, bound.seq_kv

    def to(self, device):
        return RowSlice(self.bound.to(device), self.start, self.end)

    def dense_rows(self, q_start, q_end, device=None):
        return self.bound.dense_rows(self.start + q_start, self.start + q_end, device)
