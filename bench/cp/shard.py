"""Load balancing: which token positions each rank of a CP group holds.

A shard is a tuple of segments ``(start, length)`` in original token positions, in the order the rank
stores them (its local tensor is the concatenation). Balancers:

* ``contiguous`` — rank r holds the r-th of W near-equal contiguous pieces;
* ``zigzag`` — head-tail: the sequence is cut into 2W near-equal pieces, rank r holds pieces r and 2W-1-r,
  so every rank gets the same amount of causal work (PyTorch's ``_HeadTailLoadBalancer``, ring-flash-attn's
  zigzag, TransformerEngine's dual-chunk swap);
* ``per_document`` — the same head-tail cut inside every document of a packed-document mask (PyTorch's
  ``_PerDocumentHeadTailLoadBalancer``), so each rank gets an equal share of every document's work.

Pieces differ by at most one token when lengths do not divide; shards may then differ in length, which the
layouts handle (receive buffers are sized from the shards, which every rank derives identically).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BALANCES = ("contiguous", "zigzag", "per_document")

Segment = tuple[int, int]


@dataclass(frozen=True)
class Shard:
    """The token positions one rank holds: ``segments`` of (start, length), stored in this order."""

    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(length for _, length in self.segments)

    def positions(self, device=None) -> torch.Tensor:
        """int64 original positions of the local tokens, in local order."""
        parts = [torch.arange(start, start + length, device=device) for start, length in self.segments]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)

    def local_segments(self) -> list[tuple[int, int, int]]:
        """(local offset, global start, length) of each non-empty segment."""
        out, offset = [], 0
        for start, length in self.segments:
            if length:
                out.append((offset, start, length))
            offset += length
        return out


def near_equal(total: int, parts: int) -> list[int]:
    """``parts`` lengths summing to ``total``, the first ``total % parts`` one longer."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _pieces(start: int, total: int, parts: int) -> list[Segment]:
    out, at = [], start
    for length in near_equal(total, parts):
        out.append((at, length))
        at += length
    return out


def _merge(segments: list[Segment]) -> tuple[Segment, ...]:
    """Drop empty segments and join segments that touch, keeping order."""
    out: list[list[int]] = []
    for start, length in segments:
        if not length:
            continue
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length
        else:
            out.append([start, length])
    return tuple((s, n) for s, n in out)


def document_bounds(bound) -> list[Segment] | None:
    """(start, length) of each document of a packed-document mask, or None for other masks."""
    cu = getattr(bound, "cu_seqlens", None)
    if cu is None:
        return None
    cu = [int(x) for x in cu.tolist()]
    return [(a, b - a) for a, b in zip(cu[:-1], cu[1:])]


def make_shards(balance: str, seq: int, world: int, bound=None) -> list[Shard]:
    """The shard of every rank, for ``seq`` tokens over ``world`` ranks."""
    if balance not in BALANCES:
        raise ValueError(f"cp_balance {balance!r} is not one of: {', '.join(BALANCES)}")
    if world < 1 or seq < world:
        raise ValueError(f"cannot shard {seq} tokens over {world} ranks")
    if balance == "contiguous":
        return [Shard(_merge([piece])) for piece in _pieces(0, seq, world)]
    if balance == "zigzag":
        pieces = _pieces(0, seq, 2 * world)
        return [Shard(_merge([pieces[r], pieces[2 * world - 1 - r]])) for r in range(world)]
    documents = document_bounds(bound) if bound is not None else None
    if documents is None:
        raise ValueError("cp_balance per_document needs a packed-document mask (one with cu_seqlens)")
    segments: list[list[Segment]] = [[] for _ in range(world)]
    for start, length in documents:
        pieces = _pieces(start, length, 2 * world)
        for r in range(world):
            segments[r] += [pieces[r], pieces[2 * world - 1 - r]]
    return [Shard(_merge(s)) for s in segments]


def concat(shards: list[Shard]) -> Shard:
    """The shard holding ``shards`` one after another (what an all-gather or a Ulysses group holds)."""
    return Shard(_merge([seg for shard in shards for seg in shard.segments]))
