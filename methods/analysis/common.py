"""Pieces shared by the analysis operators (methods-spec-3): the causal visibility rule, query-chunked
evaluation of quadratic forms (checkpointed under autograd, so memory stays O(chunk · seq_kv)), rotary
embeddings for the layer forms, and seeded parameters.

Conventions are the harness's: q ``[B, H, Sq, D]``, k, v ``[B, Hk, Skv, D]``; causal is bottom-right
(query ``i`` sees keys ``j <= i + offset``, ``offset = Skv - Sq``); a query that sees no key gives 0.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..linear.common import causal_visible, expand_heads, mask_mode, param_choice, param_float, param_int  # noqa: F401
from ..hybrid.layers import ParamMaker, merge_heads, rms_norm, split_heads  # noqa: F401


def visible_rows(r0: int, r1: int, seq_kv: int, causal: bool, offset: int, device) -> torch.Tensor | None:
    """bool ``[r1 - r0, seq_kv]``: the keys query rows ``r0 .. r1-1`` see (None: every key)."""
    if not causal:
        return None
    rows = torch.arange(r0, r1, device=device)[:, None]
    return torch.arange(seq_kv, device=device)[None, :] <= rows + offset


def by_query_chunks(fn: Callable[..., torch.Tensor], q: torch.Tensor, *, chunk: int, rows=None, **tensors):
    """``fn(q_rows, r0, r1, **tensors) -> [B, H, r1 - r0, Dv]`` over query chunks, concatenated along the rows.

    Under autograd each chunk is checkpointed (recomputed in the backward), so only one chunk's quadratic
    intermediates live at a time. ``rows``: a LongTensor of query rows to compute alone (the gate's sample
    of a long case); then ``fn`` gets those rows one chunk at a time with ``r0, r1`` as a row-index tensor.
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors.values()))
    if rows is not None:
        parts = [fn(q[:, :, rows[i:i + chunk]], rows[i:i + chunk], None, **tensors)
                 for i in range(0, len(rows), chunk)]
        return torch.cat(parts, dim=2)
    parts = []
    for r0 in range(0, q.shape[2], chunk):
        r1 = min(q.shape[2], r0 + chunk)
        if grad:
            parts.append(checkpoint(fn, q[:, :, r0:r1], r0, r1, use_reentrant=False, **tensors))
        else:
            parts.append(fn(q[:, :, r0:r1], r0, r1, **tensors))
    return torch.cat(parts, dim=2)


def row_visibility(r0, r1, seq_kv: int, causal: bool, offset: int, device):
    """Visibility for a chunk given as a range (``r0, r1`` ints) or as a row-index tensor (``r1`` None)."""
    if not causal:
        return None
    if isinstance(r0, torch.Tensor):
        return torch.arange(seq_kv, device=device)[None, :] <= r0.to(device)[:, None] + offset
    return visible_rows(r0, r1, seq_kv, causal, offset, device)


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of ``x [B, H, S, D]`` at ``positions [S]`` (half-split form), in x's dtype."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / max(1, half))
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:]], dim=-1)


def self_only(ctx, what: str):
    from ..registry import Unsupported

    if ctx.case.seq_q != ctx.case.seq_kv:
        raise Unsupported(f"{ctx.case.method} is {what} (seq_q == seq_kv)")


def default_chunk(seq_q: int, seq_kv: int, heads: int, batch: int, budget: int = 1 << 27) -> int:
    """Query rows per chunk so that one chunk's [B, H, rows, Skv] score block holds ~``budget`` elements."""
    return max(1, min(seq_q, budget // max(1, seq_kv * heads * batch)))


def scale_of(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
