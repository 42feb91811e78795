"""Closed-form implementations shared by most masks: every representation from a compact row description.

* ``IntervalMask`` — each query row sees the union of at most two half-open key intervals (causal, windows,
  documents, prefixes, global tokens, ...). Row counts in O(Sq); tile counts in O(Sq + tiles) by scattering
  interval ends into per-tile prefix sums.
* ``CountedMask`` — rows given by ``count_below(q, x)``, the number of visible keys ``j < x`` (periodic masks:
  dilated windows, Sparse Transformer). Row counts in O(Sq); tile counts in O(Sq * kv-blocks).
* ``BlockTableMask`` — a boolean table over fixed-size mask blocks (BigBird, random block-sparse). Counts in
  O(table + Sq / block * kv-blocks).

Each subclass still writes its own ``mask_mod``; the tests check that it agrees with the closed forms.
"""
from __future__ import annotations

import math

import torch

from .base import BoundMask, ROW_CHUNK_ELEMENTS, block_edges, block_extents

Intervals = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def ceil_div(numerator: torch.Tensor, divisor: int) -> torch.Tensor:
    """Elementwise ceil(numerator / divisor) for integer tensors and a positive divisor."""
    return -torch.div(-numerator, divisor, rounding_mode="floor")


def count_congruent(start: torch.Tensor, end: torch.Tensor, residue: torch.Tensor, modulus: int) -> torch.Tensor:
    """How many integers j in [start, end) have j ≡ residue (mod modulus); 0 where end <= start."""
    counts = ceil_div(end - residue, modulus) - ceil_div(start - residue, modulus)
    return torch.where(end > start, counts, torch.zeros_like(counts)).clamp(min=0)


def _sum_rows_into_q_blocks(values: torch.Tensor, row_start: int, block_q: int) -> torch.Tensor:
    """Sum the rows of ``values`` ([n, m], rows ``row_start..``, ``row_start`` a multiple of ``block_q``)
    into q-blocks: ``[ceil(n / block_q), m]``."""
    n, m = values.shape
    nblocks = math.ceil(n / block_q)
    padded = torch.nn.functional.pad(values, (0, 0, 0, nblocks * block_q - n))
    return padded.view(nblocks, block_q, m).sum(dim=1)


class IntervalMask(BoundMask):
    """Query row ``i`` sees the keys in at most two half-open intervals ``[start, end)`` given by
    ``row_intervals``. Intervals may overlap, touch, be empty or stick out of ``[0, seq_kv)``."""

    def row_intervals(self, q: torch.Tensor) -> Intervals:  # pragma: no cover - abstract
        """For int64 query indices ``q`` [n]: one or two (start, end) pairs of int64 tensors broadcastable to [n]."""
        raise NotImplementedError

    def normalised_intervals(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(start1, end1, start2, end2)`` [n]: inside [0, seq_kv], sorted, disjoint and not touching; an empty
        interval is (0, 0). Equal masks give equal normalised intervals."""
        pairs = [(s.expand_as(q), e.expand_as(q)) for s, e in self.row_intervals(q)]
        if len(pairs) == 1:
            pairs.append((torch.zeros_like(q), torch.zeros_like(q)))
        if len(pairs) != 2:
            raise ValueError(f"{type(self).__name__}.row_intervals gave {len(pairs)} intervals; at most 2 allowed")
        (s1, e1), (s2, e2) = [(s.clamp(0, self.seq_kv), e.clamp(0, self.seq_kv)) for s, e in pairs]
        zero = torch.zeros_like(q)
        empty1, empty2 = e1 <= s1, e2 <= s2
        # an empty first interval takes the second's place
        s1, e1, s2, e2 = (torch.where(empty1, s2, s1), torch.where(empty1, e2, e1),
                          torch.where(empty1, zero, s2), torch.where(empty1, zero, e2))
        empty1, empty2 = empty1 & empty2, empty2 | empty1
        # order the pair by start, then merge overlapping or touching intervals into the first
        swap = ~empty2 & (s2 < s1)
        s1, e1, s2, e2 = (torch.where(swap, s2, s1), torch.where(swap, e2, e1),
                          torch.where(swap, s1, s2), torch.where(swap, e1, e2))
        merge = ~empty2 & (s2 <= e1)
        e1 = torch.where(merge, torch.maximum(e1, e2), e1)
        empty2 = empty2 | merge
        s1, e1 = torch.where(empty1, zero, s1), torch.where(empty1, zero, e1)
        s2, e2 = torch.where(empty2, zero, s2), torch.where(empty2, zero, e2)
        return s1, e1, s2, e2

    def _all_rows(self) -> torch.Tensor:
        return torch.arange(self.seq_q, device=self.device)

    def row_counts(self) -> torch.Tensor:
        s1, e1, s2, e2 = self.normalised_intervals(self._all_rows())
        return (e1 - s1) + (e2 - s2)

    def block_counts(self, block_q: int = 128, block_kv: int = 128) -> torch.Tensor:
        # A row's visible keys below x are sum over its intervals of (x - start)+ - (x - end)+. Summed over a
        # q-block and evaluated at the kv-block edges x_k, each term is x_k * #{v < x_k} - sum{v < x_k}: scatter
        # every interval end v into bin v // block_kv + 1 (the first edge above it), then prefix-sum the bins.
        nq, nkv = math.ceil(self.seq_q / block_q), math.ceil(self.seq_kv / block_kv)
        s1, e1, s2, e2 = self.normalised_intervals(self._all_rows())
        ends = torch.stack([s1, e1, s2, e2])  # [4, Sq]
        signs = torch.tensor([1, -1, 1, -1], device=self.device)[:, None].expand_as(ends)
        q_block = (torch.arange(self.seq_q, device=self.device) // block_q).expand_as(ends)
        nbins = nkv + 2  # edges 0..nkv, plus one bin for ends at seq_kv that no edge exceeds
        flat = (q_block * nbins + ends // block_kv + 1).reshape(-1)
        below = torch.zeros(nq * nbins, dtype=torch.int64, device=self.device)
        below_sum = torch.zeros_like(below)
        below.index_add_(0, flat, signs.reshape(-1))
        below_sum.index_add_(0, flat, (signs * ends).reshape(-1))
        below = below.view(nq, nbins)[:, : nkv + 1].cumsum(dim=1)
        below_sum = below_sum.view(nq, nbins)[:, : nkv + 1].cumsum(dim=1)
        visible_below_edge = block_edges(self.seq_kv, block_kv, self.device)[None, :] * below - below_sum
        return visible_below_edge.diff(dim=1)

    def same_rows_as(self, other: "IntervalMask") -> bool:
        """True when both masks (same lengths) have exactly the same visible pairs; O(Sq)."""
        if (self.seq_q, self.seq_kv) != (other.seq_q, other.seq_kv):
            return False
        rows = self._all_rows()
        theirs = other.to(self.device).normalised_intervals(rows)
        return all(torch.equal(a, b) for a, b in zip(self.normalised_intervals(rows), theirs))


class CountedMask(BoundMask):
    """Rows described by ``count_below``: the number of visible keys below a bound, in closed form."""

    def count_below(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Visible keys ``j < x`` of query ``q`` (int64, broadcasting: q [n, 1], x [1, m] in [0, seq_kv])."""
        raise NotImplementedError

    def row_counts(self) -> torch.Tensor:
        q = torch.arange(self.seq_q, device=self.device)[:, None]
        x = torch.full((1, 1), self.seq_kv, device=self.device)
        return self.count_below(q, x)[:, 0]

    def block_counts(self, block_q: int = 128, block_kv: int = 128) -> torch.Tensor:
        edges = block_edges(self.seq_kv, block_kv, self.device)[None, :]
        rows_per_chunk = max(1, ROW_CHUNK_ELEMENTS // 8 // edges.shape[1] // block_q) * block_q
        out = []
        for start in range(0, self.seq_q, rows_per_chunk):
            q = torch.arange(start, min(self.seq_q, start + rows_per_chunk), device=self.device)[:, None]
            out.append(_sum_rows_into_q_blocks(self.count_below(q, edges), start, block_q).diff(dim=1))
        return torch.cat(out)


class BlockTableMask(BoundMask):
    """Visibility decided per mask block: query ``i`` sees key ``j`` when
    ``table[i // mask_block, j // mask_block]``. Subclasses set ``table`` (bool [nmq, nmk]) and
    ``mask_block`` in ``__init__``."""

    table: torch.Tensor
    mask_block: int

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.table[q_idx // self.mask_block, kv_idx // self.mask_block]

    def _visible_below(self, x: torch.Tensor) -> torch.Tensor:
        """Visible keys ``j < x`` per mask-block row: int64 [nmq, len(x)]."""
        table = self.table.to(torch.int64)
        widths = block_extents(self.seq_kv, self.mask_block, self.device)
        before = torch.nn.functional.pad((table * widths).cumsum(dim=1), (1, 0))  # [nmq, nmk + 1]
        table = torch.nn.functional.pad(table, (0, 1))  # the block index of x == seq_kv is past the table
        column = x // self.mask_block
        return before[:, column] + table[:, column] * (x - column * self.mask_block)

    def row_counts(self) -> torch.Tensor:
        per_mask_row = self._visible_below(torch.tensor([self.seq_kv], device=self.device))[:, 0]
        return per_mask_row.repeat_interleave(block_extents(self.seq_q, self.mask_block, self.device))

    def block_counts(self, block_q: int = 128, block_kv: int = 128) -> torch.Tensor:
        # Split the rows into runs that lie in one mask block and one q-block; a run's rows are identical.
        cuts = torch.cat([
            torch.arange(0, self.seq_q, self.mask_block, device=self.device),
            torch.arange(0, self.seq_q, block_q, device=self.device),
            torch.tensor([self.seq_q], device=self.device),
        ]).unique()
        run_start, run_length = cuts[:-1], cuts.diff()
        visible_below_edge = self._visible_below(block_edges(self.seq_kv, block_kv, self.device))
        per_q_block = torch.zeros(
            math.ceil(self.seq_q / block_q), visible_below_edge.shape[1], dtype=torch.int64, device=self.device
        )
        per_q_block.index_add_(
            0, run_start // block_q, run_length[:, None] * visible_below_edge[run_start // self.mask_block]
        )
        return per_q_block.diff(dim=1)
