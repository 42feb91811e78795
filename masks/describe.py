"""What the runner and the CLI need to know about a mask, as plain data."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from .base import MaskSpec
from .basic import Causal, Full
from .families import IntervalMask


def causal_kind(cls: type[MaskSpec]) -> str:
    """``"causal"``, ``"noncausal"``, or ``"by params"`` when parameters decide it (a field or a property)."""
    if isinstance(inspect.getattr_static(cls, "causal"), property) or "causal" in {
        f.name for f in dataclasses.fields(cls)
    }:
        return "by params"
    return "causal" if cls.causal else "noncausal"


def default_params(cls: type[MaskSpec]) -> dict[str, Any]:
    """Each parameter with its default."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def describe(spec: MaskSpec, seq_q: int | None = None, seq_kv: int | None = None) -> dict[str, Any]:
    """Name, label, causality, cross support and parameters of ``spec``; with lengths also ``visible_pairs``,
    ``density``, whether a varlen form exists, and ``same_as``: the label of ``full`` or ``causal`` (either
    alignment) when the mask has exactly their visible pairs at these lengths, else None."""
    info: dict[str, Any] = {
        "name": spec.name,
        "label": spec.label,
        "causal": spec.causal,
        "supports_cross": spec.supports_cross,
        "description": type(spec).description,
        "params": spec.params(),
    }
    if seq_q is None:
        return info
    bound = spec.bind(seq_q, seq_kv)
    pairs = bound.visible_pairs()
    info.update(
        seq_q=bound.seq_q,
        seq_kv=bound.seq_kv,
        visible_pairs=pairs,
        density=pairs / (bound.seq_q * bound.seq_kv),
        varlen=bound.varlen() is not None,
        same_as=_same_as(bound, pairs),
    )
    return info


def _same_as(bound, pairs: int) -> str | None:
    if pairs == bound.seq_q * bound.seq_kv:
        return Full().label
    if not isinstance(bound, IntervalMask):
        return None
    for align in ("bottom_right", "top_left"):
        causal = Causal(align=align)
        if bound.same_rows_as(causal.bind(bound.seq_q, bound.seq_kv)):
            return causal.label
    return None
