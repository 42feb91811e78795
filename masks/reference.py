"""Readable reference forms computed from a dense mask: what the fast closed forms must equal.

Everything here is O(seq_q * seq_kv): for tests and for checking a new mask at small sizes.
"""
from __future__ import annotations

import math

import torch

from .base import BlockLayout, VarlenForm


def block_counts_from_dense(dense: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """Visible pairs per tile of a bool ``[Sq, Skv]`` mask: int64 ``[ceil(Sq / block_q), ceil(Skv / block_kv)]``."""
    seq_q, seq_kv = dense.shape
    nq, nkv = math.ceil(seq_q / block_q), math.ceil(seq_kv / block_kv)
    padded = torch.nn.functional.pad(dense.to(torch.int64), (0, nkv * block_kv - seq_kv, 0, nq * block_q - seq_q))
    return padded.view(nq, block_q, nkv, block_kv).sum(dim=(1, 3))


def layout_flags(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool ``[nq, nkv]`` flags listed by ``layout``. Raises ValueError when the layout is
    malformed: indices not strictly ascending, out of range, not zero-padded, or a block listed twice."""

    def flags(num_blocks: torch.Tensor, indices: torch.Tensor, what: str) -> torch.Tensor:
        nq, nkv = indices.shape
        if num_blocks.dtype != torch.int32 or indices.dtype != torch.int32:
            raise ValueError(f"{what}: tensors must be int32, got {num_blocks.dtype} and {indices.dtype}")
        listed = torch.arange(nkv, device=indices.device)[None, :] < num_blocks[:, None]
        if (indices[~listed] != 0).any():
            raise ValueError(f"{what}: indices past the count must be 0")
        if ((indices < 0) | (indices >= nkv)).any():
            raise ValueError(f"{what}: index out of range [0, {nkv})")
        if ((indices[:, 1:] <= indices[:, :-1]) & listed[:, 1:]).any():
            raise ValueError(f"{what}: indices of a row must be strictly ascending")
        hits = torch.zeros(nq, nkv, dtype=torch.int64, device=indices.device)
        hits.scatter_add_(1, indices.long(), listed.long())
        return hits > 0

    partial = flags(layout.kv_num_blocks, layout.kv_indices, "partial blocks")
    full = flags(layout.full_kv_num_blocks, layout.full_kv_indices, "full blocks")
    if (partial & full).any():
        raise ValueError("a block is listed as both partial and full")
    return partial, full


def dense_from_varlen(form: VarlenForm, seq_q: int, seq_kv: int) -> torch.Tensor:
    """The bool ``[seq_q, seq_kv]`` mask a flash-attn style varlen kernel applies for ``form``: segments on the
    block diagonal, causal and windows aligned bottom-right inside each segment."""
    cu_q, cu_k = form.cu_seqlens_q.tolist(), form.cu_seqlens_k.tolist()
    if len(cu_q) != len(cu_k) or cu_q[0] != 0 or cu_k[0] != 0 or cu_q[-1] != seq_q or cu_k[-1] != seq_kv:
        raise ValueError(f"cu_seqlens must run from 0 to the lengths ({seq_q}, {seq_kv}), got {cu_q} and {cu_k}")
    dense = torch.zeros(seq_q, seq_kv, dtype=torch.bool)
    left, right = form.window
    for q0, q1, k0, k1 in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        i = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)  # aligned position of each query
        j = torch.arange(k1 - k0)[None, :]
        visible = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        if form.causal:
            visible &= j <= i
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        dense[q0:q1, k0:k1] = visible
    return dense
