"""Sparse patterns: BigBird and random block-sparse (decided per mask block), and the Sparse Transformer's
strided and fixed patterns (Child et al., 2019). Random choices are drawn from ``seed`` and are the same for
the same parameters and lengths."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import MaskParamError, MaskSpec, check_at_least, check_choice, check_fraction
from .basic import ALIGNMENTS, query_offset
from .families import BlockTableMask, PrefixTermsMask, RelativeMask
from .registry import register_mask


def pick_random_blocks(available: torch.Tensor, per_row: int, seed: int) -> torch.Tensor:
    """Bool table with up to ``per_row`` blocks per row drawn uniformly from the True entries of ``available``
    (all of them where fewer are available)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(available.shape, generator=generator).masked_fill(~available, 2.0)
    per_row = min(per_row, available.shape[1])
    chosen_scores, chosen = scores.topk(per_row, dim=1, largest=False)
    picked = torch.zeros_like(available)
    picked.scatter_(1, chosen, chosen_scores < 2.0)
    return picked


class BoundBigBird(BlockTableMask):
    def __init__(self, spec, seq_q, seq_kv):
        super().__init__(spec, seq_q, seq_kv)
        self.mask_block = spec.block
        blocks = math.ceil(seq_q / spec.block)
        index = torch.arange(blocks)
        is_global = index < spec.global_blocks
        fixed = is_global[:, None] | is_global[None, :] | ((index[:, None] - index[None, :]).abs() <= spec.window_blocks)
        random = pick_random_blocks(~fixed, spec.random_blocks, spec.seed)  # global rows are full already
        self.table = fixed | random


@register_mask
@dataclass(frozen=True)
class BigBird(MaskSpec):
    """BigBird's block-sparse pattern over blocks of ``block`` tokens: ``global_blocks`` leading blocks that see
    and are seen by all, a window of ``window_blocks`` blocks on each side, and ``random_blocks`` random blocks
    per (non-global) row."""

    name = "bigbird"
    causal = False
    supports_cross = False
    description = "block-sparse: global blocks + window blocks + random blocks per row (BigBird)"
    bound_cls = BoundBigBird
    block: int = 64
    global_blocks: int = 1
    window_blocks: int = 1
    random_blocks: int = 2
    seed: int = 0

    def _validate(self) -> None:
        check_at_least(self, "block", 1)
        for field in ("global_blocks", "window_blocks", "random_blocks"):
            check_at_least(self, field, 0)


class BoundRandomBlockSparse(BlockTableMask):
    def __init__(self, spec, seq_q, seq_kv):
        super().__init__(spec, seq_q, seq_kv)
        self.mask_block = spec.block
        q_blocks, kv_blocks = math.ceil(seq_q / spec.block), math.ceil(seq_kv / spec.block)
        per_row = max(1, round(spec.density * kv_blocks))
        self.table = pick_random_blocks(torch.ones(q_blocks, kv_blocks, dtype=torch.bool), per_row, spec.seed)


@register_mask
@dataclass(frozen=True)
class RandomBlockSparse(MaskSpec):
    """Every q-block of ``block`` tokens sees ``max(1, round(density * kv_blocks))`` kv-blocks drawn at random:
    the block density is ``density`` up to rounding, and no query row is empty."""

    name = "random_block_sparse"
    causal = False
    description = "each q-block sees random kv-blocks, density `density` of the blocks (at least one)"
    bound_cls = BoundRandomBlockSparse
    block: int = 64
    density: float = 0.1
    seed: int = 0

    def _validate(self) -> None:
        check_at_least(self, "block", 1)
        check_fraction(self, "density", allow_zero=False)


class BoundStrided(RelativeMask):
    def __init__(self, spec, seq_q, seq_kv):
        super().__init__(spec, seq_q, seq_kv)
        self.offset = query_offset(spec.align, seq_q, seq_kv)

    def visible_at(self, distance):
        stride = self.spec.stride
        return (distance >= 0) & ((distance < stride) | (distance % stride == 0))


@register_mask
@dataclass(frozen=True)
class SparseStrided(MaskSpec):
    """Sparse Transformer, strided: query at p sees the previous ``stride`` positions (p-stride+1..p) and every
    ``stride``-th position before (p - k*stride)."""

    name = "sparse_strided"
    causal = True
    description = "Sparse Transformer strided: the last `stride` keys plus every `stride`-th earlier key"
    bound_cls = BoundStrided
    stride: int = 128
    align: str = "bottom_right"

    def _validate(self) -> None:
        check_at_least(self, "stride", 1)
        check_choice(self, "align", ALIGNMENTS)


class BoundFixed(PrefixTermsMask):
    def __init__(self, spec, seq_q, seq_kv):
        super().__init__(spec, seq_q, seq_kv)
        self.offset = query_offset(spec.align, seq_q, seq_kv)

    def mask_mod(self, b, h, q_idx, kv_idx):
        stride, summary = self.spec.stride, self.spec.summary
        position = q_idx + self.offset
        same_chunk = kv_idx // stride == position // stride
        return (kv_idx <= position) & (same_chunk | (kv_idx % stride >= stride - summary))

    def summaries_below(self, bound: torch.Tensor) -> torch.Tensor:
        """Keys j < bound in the last ``summary`` positions of their chunk."""
        stride, summary = self.spec.stride, self.spec.summary
        return (bound // stride) * summary + (bound % stride - (stride - summary)).clamp(min=0)

    def prefix_terms(self, q):
        # the own chunk up to the query: [chunk_start, position]; before it, the summary keys
        stride = self.spec.stride
        position = q + self.offset
        chunk_start = (torch.div(position, stride, rounding_mode="floor") * stride).clamp(0, self.seq_kv)
        end = (position + 1).clamp(0, self.seq_kv)
        return [(end, 1, None), (chunk_start, -1, None), (chunk_start, 1, self.summaries_below)]


@register_mask
@dataclass(frozen=True)
class SparseFixed(MaskSpec):
    """Sparse Transformer, fixed: query at p sees its own chunk of ``stride`` positions up to p, and the last
    ``summary`` positions of every earlier chunk."""

    name = "sparse_fixed"
    causal = True
    description = "Sparse Transformer fixed: own chunk (causal) plus the last `summary` keys of earlier chunks"
    bound_cls = BoundFixed
    stride: int = 128
    summary: int = 8
    align: str = "bottom_right"

    def _validate(self) -> None:
        check_at_least(self, "stride", 1)
        check_at_least(self, "summary", 1)
        if self.summary > self.stride:
            raise MaskParamError(self.name, "summary", f"must be <= stride ({self.stride}), got {self.summary}")
        check_choice(self, "align", ALIGNMENTS)
