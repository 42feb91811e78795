"""Closed-form implementations shared by most masks: every representation from a compact row description.

* ``PrefixTermsMask`` — each row's visible keys below ``x`` are ``sum_t sign_t * g_t(min(bound_t(row), x))``
  for a few per-row bounds and shared column-prefix functions ``g_t``. Row counts in O(Sq); tile counts in
  O(Sq + tiles), by scattering the bounds into per-tile prefix sums.
* ``IntervalMask`` — the common case: each row sees the union of at most two key intervals (causal, windows,
  documents, prefixes, global tokens, ...); ``g`` is the identity.
* ``RelativeMask`` — visibility depends only on the distance ``(q + offset) - kv`` (Toeplitz: dilated windows,
  Sparse Transformer strided). Row and tile counts from double prefix sums over distances, O(Sq + Skv + tiles).
* ``BlockTableMask`` — a boolean table over fixed-size mask blocks (BigBird, random block-sparse). Counts in
  O(table + Sq / block * kv-blocks).

Each subclass of the first two writes its own ``mask_mod`` and the tests check it against the closed forms;
the last two derive ``mask_mod`` from their single definition.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .base import BoundMask, block_edges, block_extents

Intervals = tuple[tuple[torch.Tensor, torch.Tensor], ...]
PrefixTerm = tuple[torch.Tensor, int, Callable[[torch.Tensor], torch.Tensor] | None]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class PrefixTermsMask(BoundMask):
    """Rows described by ``prefix_terms``: the visible keys ``j < x`` of row ``q`` are
    ``sum_t sign_t * g_t(min(bound_t[q], x))`` for every ``x`` in [0, seq_kv]."""

    def prefix_terms(self, q: torch.Tensor) -> list[PrefixTerm]:  # pragma: no cover - abstract
        """For int64 query indices ``q`` [n]: (bound [n] in [0, seq_kv], sign ±1, g) triples; ``g`` maps
        int64 key bounds to the count of some column set below them (None = identity), elementwise."""
        raise NotImplementedError

    def _all_rows(self) -> torch.Tensor:
        return torch.arange(self.seq_q, device=self.device)

    def row_counts(self) -> torch.Tensor:
        total = torch.zeros(self.seq_q, dtype=torch.int64, device=self.device)
        for bound, sign, g in self.prefix_terms(self._all_rows()):
            total += sign * (g or _identity)(bound)
        return total

    def block_counts(self, block_q: int = 128, block_kv: int = 128) -> torch.Tensor:
        # Per q-block and kv-block edge x_k: sum_rows g(min(v, x_k)) = g(x_k) * #{v >= x_k} + sum_{v < x_k} g(v).
        # Scatter each bound v into bin v // block_kv + 1 (the first edge above it), then prefix-sum the bins.
        nq, nkv = math.ceil(self.seq_q / block_q), math.ceil(self.seq_kv / block_kv)
        nbins = nkv + 2  # edges 0..nkv, plus one bin for bounds at seq_kv that no edge exceeds
        edges = block_edges(self.seq_kv, block_kv, self.device)
        rows = self._all_rows()
        q_block = rows // block_q
        rows_per_block = block_extents(self.seq_q, block_q, self.device)
        total = torch.zeros(nq, nkv + 1, dtype=torch.int64, device=self.device)
        for bound, sign, g in self.prefix_terms(rows):
            g = g or _identity
            bound = bound.expand_as(rows)
            flat = q_block * nbins + bound // block_kv + 1
            below = torch.zeros(nq * nbins, dtype=torch.int64, device=self.device)
            below_sum = torch.zeros_like(below)
            below.index_add_(0, flat, torch.ones_like(bound))
            below_sum.index_add_(0, flat, g(bound))
            below = below.view(nq, nbins)[:, : nkv + 1].cumsum(dim=1)
            below_sum = below_sum.view(nq, nbins)[:, : nkv + 1].cumsum(dim=1)
            total += sign * (g(edges)[None, :] * (rows_per_block[:, None] - below) + below_sum)
        return total.diff(dim=1)


class IntervalMask(PrefixTermsMask):
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

    def prefix_terms(self, q: torch.Tensor) -> list[PrefixTerm]:
        s1, e1, s2, e2 = self.normalised_intervals(q)
        return [(e1, 1, None), (s1, -1, None), (e2, 1, None), (s2, -1, None)]

    def same_rows_as(self, other: "IntervalMask") -> bool:
        """True when both masks (same lengths) have exactly the same visible pairs; O(Sq)."""
        if (self.seq_q, self.seq_kv) != (other.seq_q, other.seq_kv):
            return False
        rows = self._all_rows()
        theirs = other.to(self.device).normalised_intervals(rows)
        return all(torch.equal(a, b) for a, b in zip(self.normalised_intervals(rows), theirs))


class RelativeMask(BoundMask):
    """Query ``i`` sees key ``j`` when ``visible_at(i + offset - j)``: a Toeplitz mask. Subclasses set
    ``offset`` and define ``visible_at`` with broadcasting torch ops (it is also the ``mask_mod``)."""

    offset: int

    def visible_at(self, distance: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Bool: is a key at ``distance`` positions before the query (negative: after it) visible."""
        raise NotImplementedError

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.visible_at(q_idx + self.offset - kv_idx)

    def _distance_sums(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(lowest, A, B): ``A[d - lowest]`` = visible distances in [lowest, d], ``B[d - lowest]`` = sum of A over
        [lowest, d], for d from ``lowest`` (two below the least real distance, so every index the count formulas
        use is >= 0) to the greatest. The formulas take differences in which the start of the sums cancels."""
        lowest = self.offset - self.seq_kv - 1
        distances = torch.arange(lowest, self.offset + self.seq_q, device=self.device)
        at_most = self.visible_at(distances).to(torch.int64).cumsum(0)
        return lowest, at_most, at_most.cumsum(0)

    def row_counts(self) -> torch.Tensor:
        lowest, at_most, _ = self._distance_sums()
        position = torch.arange(self.seq_q, device=self.device) + self.offset
        return at_most[position - lowest] - at_most[position - self.seq_kv - lowest]

    def block_counts(self, block_q: int = 128, block_kv: int = 128) -> torch.Tensor:
        # tile [P0, P1) x [c0, c1): sum_p A(p - c0) - A(p - c1), and sum_{p in [P0, P1)} A(p - c) = B(P1-1-c) - B(P0-1-c)
        lowest, _, summed = self._distance_sums()
        positions = block_edges(self.seq_q, block_q, self.device) + self.offset - 1 - lowest
        columns = block_edges(self.seq_kv, block_kv, self.device)
        rows_end, rows_start = positions[1:, None], positions[:-1, None]
        col_start, col_end = columns[None, :-1], columns[None, 1:]
        return (summed[rows_end - col_start] - summed[rows_start - col_start]
                - summed[rows_end - col_end] + summed[rows_start - col_end])


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
