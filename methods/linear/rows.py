"""Shared pieces of the ``rows=`` references of methods outside the kernelised skeleton (abc, s4d,
softmax_rnn, aaren, ...): a long case (above ``correctness.ref_full_pairs`` query×key pairs) is gated on a
strided sample of query rows, and the method's own reference then runs on those rows only, streaming the keys
in chunks with a carried state, so its memory stays flat in the length (the kernelised methods use
``common.feature_rows``/``streamed_rows``, the delta rules ``gated_delta.delta_rows``).
"""
from __future__ import annotations

import torch

ROWS_CHUNK = 4096  # keys per streaming step of these rows forms (``reference_stream_chunk``)


def last_keys(rows: torch.Tensor, *, causal: bool, offset: int, seq_kv: int) -> torch.Tensor:
    """The last key each query row sees: ``row + offset`` (causal, bottom-right aligned), else ``seq_kv - 1``
    (below 0: none)."""
    rows = rows.long()
    return (rows + offset).clamp(max=seq_kv - 1) if causal else torch.full_like(rows, seq_kv - 1)


def softmax_rows(chunk_fn, seq_kv: int, last: torch.Tensor, *, chunk: int = ROWS_CHUNK, carry: bool = True):
    """Softmax attention of a few query rows over their visible keys, streamed over the keys (the online
    softmax: running maximum ``m``, normaliser ``c``, weighted sum ``a`` per row, fp32).

    ``chunk_fn(start, stop) -> (scores [B, H, r or 1, n], values [B, H, n, dv])`` gives the scores of the rows
    against keys ``start .. stop-1`` (already scaled; a ``1`` in the row axis broadcasts one score row to every
    row, as Aaren's fixed query) and those keys' values. ``last`` [r]: the last key each row sees (row ``i``
    sees keys ``0 .. last_i``; below 0: none, output 0). Keys past the largest ``last`` are not read. Extra
    memory O(r · chunk) per (batch, head). Returns ``[B, H, r, dv]`` fp32. ``carry=False`` (each chunk starts
    from an empty state) is a deliberately broken variant for the tests' negative control."""
    if chunk < 1:
        raise ValueError(f"softmax_rows: chunk must be >= 1, got {chunk}")
    last = last.long()
    end = max(0, min(seq_kv, int(last.max()) + 1)) if last.numel() else 0
    m = c = a = None
    for start in range(0, end, chunk) if end else [0]:  # no visible key at all: one empty read for the shapes
        stop = min(start + chunk, end)
        s, vv = chunk_fn(start, stop)
        s, vv = s.float(), vv.float()
        if a is None:
            shape = (*vv.shape[:2], last.numel())
            m = torch.full((*shape, 1), float("-inf"), device=vv.device)
            c = torch.zeros(*shape, 1, device=vv.device)
            a = torch.zeros(*shape, vv.shape[-1], device=vv.device)
        hidden = torch.arange(start, stop, device=vv.device)[None, :] > last.to(vv.device)[:, None]  # [r, n]
        s = s.expand(*s.shape[:2], last.numel(), -1).masked_fill(hidden, float("-inf"))
        if stop == start:
            break
        if not carry:
            m, c, a = torch.full_like(m, float("-inf")), torch.zeros_like(c), torch.zeros_like(a)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - safe)
        decay = torch.exp(m - safe)
        c = c * decay + p.sum(-1, keepdim=True)
        a = a * decay + p @ vv
        m = m_new
    return torch.where(c > 0, a / c.clamp_min(1e-30), torch.zeros_like(a))
