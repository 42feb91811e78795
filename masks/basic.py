"""Full and causal masks, for self and cross attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BoundMask, MaskParamError, MaskSpec, VarlenForm
from .registry import register_mask

ALIGNMENTS = ("bottom_right", "top_left")


def _single_segment(seq_q: int, seq_kv: int, causal: bool) -> VarlenForm:
    return VarlenForm(
        cu_seqlens_q=torch.tensor([0, seq_q], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, seq_kv], dtype=torch.int32),
        max_seqlen_q=seq_q,
        max_seqlen_k=seq_kv,
        causal=causal,
    )


class BoundFull(BoundMask):
    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)

    def visible_pairs(self) -> int:
        return self.seq_q * self.seq_kv

    def row_counts(self) -> torch.Tensor:
        return torch.full((self.seq_q,), self.seq_kv, dtype=torch.int64)

    def varlen(self) -> VarlenForm:
        return _single_segment(self.seq_q, self.seq_kv, causal=False)


@register_mask
@dataclass(frozen=True)
class Full(MaskSpec):
    """Every query sees every key (noncausal self or cross attention)."""

    name = "full"
    causal = False
    bound_cls = BoundFull


class BoundCausal(BoundMask):
    def __init__(self, spec, seq_q, seq_kv):
        super().__init__(spec, seq_q, seq_kv)
        # query i sees keys j <= i + offset
        self.offset = seq_kv - seq_q if spec.align == "bottom_right" else 0

    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset

    def row_counts(self) -> torch.Tensor:
        rows = torch.arange(self.seq_q, dtype=torch.int64) + self.offset + 1
        return rows.clamp(0, self.seq_kv)

    def visible_pairs(self) -> int:
        return int(self.row_counts().sum())

    def varlen(self) -> VarlenForm | None:
        # flash-attn's causal flag is bottom-right aligned; top-left equals it only when seq_q == seq_kv.
        if self.offset != self.seq_kv - self.seq_q:
            return None
        return _single_segment(self.seq_q, self.seq_kv, causal=True)


@register_mask
@dataclass(frozen=True)
class Causal(MaskSpec):
    """Query i sees keys up to its own position. For seq_q != seq_kv, ``align`` says which corners meet:
    ``bottom_right`` (the last query sees every key, as in decoding) or ``top_left`` (query i sees keys <= i)."""

    name = "causal"
    causal = True
    bound_cls = BoundCausal
    align: str = "bottom_right"

    def _validate(self) -> None:
        if self.align not in ALIGNMENTS:
            raise MaskParamError(self.name, "align", f"must be one of {', '.join(ALIGNMENTS)}, got {self.align!r}")
