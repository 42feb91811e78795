"""Local masks: sliding windows (bidirectional, causal, dilated), chunked local attention, Longformer.

Windows count keys, not span: ``left`` keys before the query's aligned position and ``right`` keys after
it are visible, plus the position itself (flash-attn's ``window_size=(left, right)``). Queries are aligned to
keys as in ``masks.basic`` (``align``, bottom-right by default, which is what flash-attn does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MaskParamError, MaskSpec, VarlenForm, check_at_least, check_choice
from .basic import ALIGNMENTS, AlignedMask, query_offset, single_segment
from .families import IntervalMask, RelativeMask
from .registry import register_mask


class BoundSlidingWindow(AlignedMask):
    def mask_mod(self, b, h, q_idx, kv_idx):
        position = q_idx + self.offset
        return (kv_idx >= position - self.spec.left) & (kv_idx <= position + self.spec.right)

    def row_intervals(self, q):
        position = q + self.offset
        return ((position - self.spec.left, position + self.spec.right + 1),)

    def varlen(self) -> VarlenForm | None:
        if not self.varlen_alignment_ok():
            return None
        right = self.spec.right
        return single_segment(self.seq_q, self.seq_kv, causal=right == 0, window=(self.spec.left, right))


@register_mask
@dataclass(frozen=True)
class SlidingWindow(MaskSpec):
    """Query at position p sees keys in [p - left, p + right]; ``right=0`` is the causal sliding window
    (Mistral-style local attention), ``right > 0`` a bidirectional one."""

    name = "sliding_window"
    description = "query at p sees keys p-left..p+right; right=0 is the causal sliding window"
    bound_cls = BoundSlidingWindow
    left: int = 256
    right: int = 0
    align: str = "bottom_right"

    @property
    def causal(self) -> bool:
        return self.right == 0

    def _validate(self) -> None:
        check_at_least(self, "left", 0)
        check_at_least(self, "right", 0)
        check_choice(self, "align", ALIGNMENTS)


class BoundDilatedWindow(RelativeMask):
    def __init__(self, spec, seq_q, seq_kv):
        super().__init__(spec, seq_q, seq_kv)
        self.offset = query_offset(spec.align, seq_q, seq_kv)

    def visible_at(self, distance):
        spec = self.spec
        return (
            (distance % spec.dilation == 0)
            & (distance <= spec.left * spec.dilation)
            & (distance >= -spec.right * spec.dilation)
        )


@register_mask
@dataclass(frozen=True)
class DilatedSlidingWindow(MaskSpec):
    """Query at position p sees keys p - k*dilation for k = 0..left and p + k*dilation for k = 0..right
    (Longformer's dilated window: ``left + right + 1`` keys spread over ``(left + right) * dilation + 1``)."""

    name = "dilated_sliding_window"
    description = "keys p-k*dilation (k<=left) and p+k*dilation (k<=right): a window with gaps"
    bound_cls = BoundDilatedWindow
    left: int = 128
    right: int = 0
    dilation: int = 2
    align: str = "bottom_right"

    @property
    def causal(self) -> bool:
        return self.right == 0

    def _validate(self) -> None:
        check_at_least(self, "left", 0)
        check_at_least(self, "right", 0)
        check_at_least(self, "dilation", 1)
        check_choice(self, "align", ALIGNMENTS)


class BoundChunkedLocal(AlignedMask):
    def mask_mod(self, b, h, q_idx, kv_idx):
        position = q_idx + self.offset
        return (kv_idx <= position) & (kv_idx // self.spec.chunk == position // self.spec.chunk)

    def row_intervals(self, q):
        position = q + self.offset
        chunk = self.spec.chunk
        return ((torch.div(position, chunk, rounding_mode="floor") * chunk, position + 1),)

    def varlen(self) -> VarlenForm | None:
        if self.seq_q != self.seq_kv:
            return None
        cu_seqlens = torch.tensor([*range(0, self.seq_q, self.spec.chunk), self.seq_q], dtype=torch.int32)
        return VarlenForm(cu_seqlens, cu_seqlens, min(self.spec.chunk, self.seq_q), min(self.spec.chunk, self.seq_q),
                          causal=True)


@register_mask
@dataclass(frozen=True)
class ChunkedLocal(MaskSpec):
    """Attention inside fixed chunks of ``chunk`` positions, causal inside (Llama 4's local layers)."""

    name = "chunked_local"
    causal = True
    description = "causal attention inside fixed chunks of `chunk` positions, nothing across chunks"
    bound_cls = BoundChunkedLocal
    chunk: int = 1024
    align: str = "bottom_right"

    def _validate(self) -> None:
        check_at_least(self, "chunk", 1)
        check_choice(self, "align", ALIGNMENTS)


class BoundLongformer(IntervalMask):
    def mask_mod(self, b, h, q_idx, kv_idx):
        spec = self.spec
        in_window = (kv_idx >= q_idx - spec.left) & (kv_idx <= q_idx + spec.right)
        return (q_idx < spec.global_tokens) | (kv_idx < spec.global_tokens) | in_window

    def row_intervals(self, q):
        spec = self.spec
        is_global = q < spec.global_tokens
        global_end = torch.where(is_global, self.seq_kv, spec.global_tokens)
        return ((torch.zeros_like(q), global_end), (q - spec.left, q + spec.right + 1))


@register_mask
@dataclass(frozen=True)
class Longformer(MaskSpec):
    """Sliding window plus global tokens: the first ``global_tokens`` positions see and are seen by all."""

    name = "longformer"
    causal = False
    supports_cross = False
    description = "sliding window (left, right) plus `global_tokens` leading tokens that see and are seen by all"
    bound_cls = BoundLongformer
    left: int = 256
    right: int = 256
    global_tokens: int = 16

    def _validate(self) -> None:
        check_at_least(self, "left", 0)
        check_at_least(self, "right", 0)
        check_at_least(self, "global_tokens", 0)

    def _validate_lengths(self, seq_q: int, seq_kv: int) -> None:
        if self.global_tokens > seq_q:
            raise MaskParamError(self.name, "global_tokens", f"must be <= seq_q = {seq_q}, got {self.global_tokens}")
