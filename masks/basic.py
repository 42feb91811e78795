"""Masks over one sequence: full, causal, decode, prefix-LM and block-causal, for self and cross attention.

Cross attention (``seq_q != seq_kv``) needs an alignment of the two sequences: query ``i`` stands at key
position ``i + offset`` with ``offset = seq_kv - seq_q`` for ``bottom_right`` (the last query meets the last
key, as in decoding and flash-attn) or ``0`` for ``top_left`` (query ``i`` meets key ``i``). For self attention
both are the same. CAB's four patterns are ``full`` and ``causal`` with ``seq_q == seq_kv`` (self) or not (cross).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import MaskParamError, MaskSpec, VarlenForm, check_at_least, check_choice
from .families import IntervalMask
from .registry import register_mask

ALIGNMENTS = ("bottom_right", "top_left")


def query_offset(align: str, seq_q: int, seq_kv: int) -> int:
    """Key position of query 0 under ``align``: ``seq_kv - seq_q`` (bottom_right) or 0 (top_left)."""
    return seq_kv - seq_q if align == "bottom_right" else 0


def single_segment(seq_q: int, seq_kv: int, causal: bool, window: tuple[int, int] = (-1, -1)) -> VarlenForm:
    """The varlen form of one segment holding both whole sequences."""
    return VarlenForm(
        cu_seqlens_q=torch.tensor([0, seq_q], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, seq_kv], dtype=torch.int32),
        max_seqlen_q=seq_q,
        max_seqlen_k=seq_kv,
        causal=causal,
        window=window,
    )


class AlignedMask(IntervalMask):
    """An interval mask whose queries sit at key positions ``q + offset`` (see ``query_offset``)."""

    def __init__(self, spec, seq_q, seq_kv):
        super().__init__(spec, seq_q, seq_kv)
        self.offset = query_offset(spec.align, seq_q, seq_kv)

    def varlen_alignment_ok(self) -> bool:
        """flash-attn aligns bottom-right; top-left matches it only when the lengths are equal."""
        return self.offset == self.seq_kv - self.seq_q


class BoundFull(IntervalMask):
    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)

    def row_intervals(self, q):
        return ((torch.zeros_like(q), torch.full_like(q, self.seq_kv)),)

    def varlen(self) -> VarlenForm:
        return single_segment(self.seq_q, self.seq_kv, causal=False)

    def visible_pairs(self) -> int:
        return self.seq_q * self.seq_kv  # O(1) at any length


@register_mask
@dataclass(frozen=True)
class Full(MaskSpec):
    """Every query sees every key (noncausal self or cross attention)."""

    name = "full"
    causal = False
    description = "every query sees every key (noncausal self or cross attention)"
    bound_cls = BoundFull


class BoundCausal(AlignedMask):
    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset

    def row_intervals(self, q):
        return ((torch.zeros_like(q), q + self.offset + 1),)

    def varlen(self) -> VarlenForm | None:
        if not self.varlen_alignment_ok():
            return None
        return single_segment(self.seq_q, self.seq_kv, causal=True)

    def visible_pairs(self) -> int:
        """O(1): row i sees clamp(i + offset + 1, 0, seq_kv) keys; clamp(x, 0, S) = relu(x) - relu(x - S)."""
        def relu_sum(low: int, high: int) -> int:  # sum of max(x, 0) for x in [low, high]
            def up_to(n: int) -> int:
                return n * (n + 1) // 2 if n > 0 else 0

            return up_to(high) - up_to(low - 1)

        low, high = self.offset + 1, self.offset + self.seq_q
        return relu_sum(low, high) - relu_sum(low - self.seq_kv, high - self.seq_kv)


@register_mask
@dataclass(frozen=True)
class Causal(MaskSpec):
    """Query i sees keys up to its own position. For seq_q != seq_kv, ``align`` says which corners meet:
    ``bottom_right`` (the last query sees every key, as in decoding) or ``top_left`` (query i sees keys <= i)."""

    name = "causal"
    causal = True
    description = "query i sees keys j <= i (+ seq_kv - seq_q when aligned bottom_right)"
    bound_cls = BoundCausal
    align: str = "bottom_right"

    def _validate(self) -> None:
        check_choice(self, "align", ALIGNMENTS)


@register_mask
@dataclass(frozen=True)
class Decode(MaskSpec):
    """A few queries (the newest tokens) against a long cache: causal, aligned bottom-right."""

    name = "decode"
    causal = True
    description = "a few new queries against a long key cache, causal aligned bottom-right"
    bound_cls = BoundCausal
    align: ClassVar[str] = "bottom_right"

    def _validate_lengths(self, seq_q: int, seq_kv: int) -> None:
        if seq_q > seq_kv:
            raise MaskParamError(
                self.name, "seq_q", f"decode needs seq_q <= seq_kv (queries are the cache's newest tokens), "
                f"got seq_q={seq_q} > seq_kv={seq_kv}"
            )


class BoundPrefixLM(AlignedMask):
    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx < self.spec.prefix) | (kv_idx <= q_idx + self.offset)

    def row_intervals(self, q):
        return ((torch.zeros_like(q), torch.clamp(q + self.offset + 1, min=self.spec.prefix)),)


@register_mask
@dataclass(frozen=True)
class PrefixLM(MaskSpec):
    """Keys ``< prefix`` are visible to every query (a bidirectional prefix); after it, causal."""

    name = "prefix_lm"
    causal = False
    description = "bidirectional prefix of `prefix` keys seen by every query, causal after it"
    bound_cls = BoundPrefixLM
    prefix: int = 256
    align: str = "bottom_right"

    def _validate(self) -> None:
        check_at_least(self, "prefix", 0)
        check_choice(self, "align", ALIGNMENTS)

    def _validate_lengths(self, seq_q: int, seq_kv: int) -> None:
        if self.prefix > seq_kv:
            raise MaskParamError(self.name, "prefix", f"must be <= seq_kv = {seq_kv}, got {self.prefix}")


class BoundBlockCausal(AlignedMask):
    def mask_mod(self, b, h, q_idx, kv_idx):
        block = self.spec.block
        return kv_idx // block <= (q_idx + self.offset) // block

    def row_intervals(self, q):
        block = self.spec.block
        return ((torch.zeros_like(q), (torch.div(q + self.offset, block, rounding_mode="floor") + 1) * block),)


@register_mask
@dataclass(frozen=True)
class BlockCausal(MaskSpec):
    """Causal between blocks of ``block`` tokens, bidirectional inside a block: query in block k sees every
    key in blocks 0..k. Not ``causal``: a query sees the later keys of its own block."""

    name = "block_causal"
    causal = False
    description = "causal blockwise: a query sees every key of its own and earlier blocks of `block` tokens"
    bound_cls = BoundBlockCausal
    block: int = 128
    align: str = "bottom_right"

    def _validate(self) -> None:
        check_at_least(self, "block", 1)
        check_choice(self, "align", ALIGNMENTS)
