"""The case: one point of the sweep grid (DESIGN.md §2), typed.

It lives beside the methods so that ``methods/``, ``masks/`` and ``tasks/`` can name it (a builder's
``ctx.case`` is a :class:`Case`) without importing the runner; the runner's planner makes them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

# the fields that identify a case: equal values, equal case_id, in every run
KEY_FIELDS = (
    "method", "mask", "batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim", "dtype", "mode",
    "layout", "world_size", "seed",
)


@dataclass(frozen=True)
class Case:
    """One point of the grid (DESIGN.md §2)."""

    method: str
    mask: str  # canonical label; masks.make_mask(mask) rebuilds the spec
    mask_name: str
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    dtype: str
    mode: str
    layout: str = "single"
    world_size: int = 1
    seed: int = 0
    device: str = "cpu"

    @property
    def case_id(self) -> str:
        key = json.dumps([getattr(self, f) for f in KEY_FIELDS], sort_keys=True)
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    @property
    def needs_grad(self) -> bool:
        return self.mode in ("bwd", "fwd_bwd")

    def input_key(self) -> tuple:
        """Cases with equal keys share inputs and the fp32 reference."""
        return (self.mask, self.batch, self.heads_q, self.heads_kv, self.seq_q, self.seq_kv, self.head_dim,
                self.dtype, self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Case":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def pattern_of(causal: bool, seq_q: int, seq_kv: int) -> str:
    """CAB's pattern name: (non)causal x self/cross (cross when the lengths differ: decode, encoder memory)."""
    kind = "cross" if seq_q != seq_kv else "self"
    return f"{'causal' if causal else 'noncausal'}_{kind}"
