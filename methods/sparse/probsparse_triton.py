"""ProbSparse's sparsity measurement (the ``routing`` phase of ``probsparse``, methods/sparse/probsparse.py) as one
Triton kernel: ``method_options.probsparse.measure: triton``. Imported lazily by the builder: importing this module
imports triton.

What it computes: :func:`probsparse.measurements` (``M(q_i) = max_j(q_i . k_j) - sum_j(q_i . k_j) / Lk`` over
the keys ``j`` sampled for query ``i``, fp32 from the inputs widened), ``[B, H, Lq]`` fp32. The PyTorch form
gathers the sampled keys, ``[B, H, rows, U, D]`` in fp32, in chunks: at 1M tokens, 16 heads, d 128 and U = 70
samples that is ~600 GB written and read again (the H200 rows: 99 % of probsparse's 1,519 ms full 1M fwd in its
routing phase, results/h200-sparse/sparse-summary.md). The kernel reads each sampled key row once, as it is
stored (bf16: 256 B), and keeps nothing but the running max and sum per query.

Kernel (:func:`_measure_src`, grid ``(cdiv(Lq, BLOCK_R), B * H)``): one program per head and block of
``BLOCK_R`` queries; it loads its q block once (widened to fp32; head dims up to ``BLOCK_D`` in registers, wider
in chunks), then for each of the U samples loads the sample indices of its rows and their key rows (a gather:
every query meets its own key; no ``tl.dot``) and accumulates the row-wise fp32 dot into a running max and sum.
Offsets are int64 (a [1, 16, 1M, 128] tensor has 2^31 elements).

Numerics: fp32 products summed in a tree over the head dim (PyTorch's einsum sums in another order), so a
measurement may differ in the last bits; the top-u selection of the two can then differ only on a near-tie at
the u-th place (the reference routes with PyTorch, as superlinear's does with its search).
``fault`` (tests' negative controls): ``'no_max'`` drops the max term, ``'first_sample'`` reads sample 0 only.
CUDA or ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear.linear_triton import interpreting, jit_kernel

BLOCK_R = 64  # queries per program
BLOCK_D = 128  # head-dim columns per register tile
NUM_WARPS = 4
FAULTS = {None: 0, "no_max": 1, "first_sample": 2}


def _measure_src(Q, K, S, OUT, LQ, LK, U, H,
                 sqb, sqh, sql, sqd, skb, skh, skl, skd, ssl, ssu,
                 D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, ND: tl.constexpr, FAULT: tl.constexpr,
                 U_INTERP: tl.constexpr):
    pid_r = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = (pid_r * BR + tl.arange(0, BR)).to(tl.int64)
    live = rows < LQ
    cols = tl.arange(0, BD).to(tl.int64)
    q_base = Q + b * sqb + h * sqh + rows[:, None] * sql
    k_base = K + b * skb + h * skh
    best = tl.full([BR], float("-inf"), tl.float32)
    total = tl.zeros([BR], dtype=tl.float32)
    # U_INTERP > 0 in the interpreter only (a constexpr loop bound: there a loop cannot take a runtime int
    # argument's value, as in superlinear_search_triton); compiled, the loop runs to the runtime U
    for u in range(0, U_INTERP if U_INTERP > 0 else U):
        idx = tl.load(S + rows * ssl + u * ssu, mask=live, other=0).to(tl.int64)
        score = tl.zeros([BR], dtype=tl.float32)
        for c in range(0, ND):  # head-dim chunks (one for D <= BLOCK_D)
            d = c * BD + cols
            m = live[:, None] & (d < D)[None, :]
            qb = tl.load(q_base + d[None, :] * sqd, mask=m, other=0.0).to(tl.float32)
            kb = tl.load(k_base + idx[:, None] * skl + d[None, :] * skd, mask=m, other=0.0).to(tl.float32)
            score += tl.sum(qb * kb, axis=1)
        best = tl.maximum(best, score)
        total += score
    if FAULT == 1:
        best = tl.zeros([BR], dtype=tl.float32)
    tl.store(OUT + bh * LQ + rows, best - total / LK, mask=live)


def measure(q: torch.Tensor, k: torch.Tensor, samples: torch.Tensor, *, block_r: int = BLOCK_R,
            block_d: int = BLOCK_D, num_warps: int = NUM_WARPS, fault: str | None = None) -> torch.Tensor:
    """The sparsity measurement ``[B, H, Lq]`` fp32 of ``q [B, H, Lq, D]`` against ``k [B, H, Lk, D]`` at the
    sampled key indices ``samples [Lq, U]`` (shared by batch and heads; any integer dtype). Not differentiated
    (routing). CUDA or ``TRITON_INTERPRET=1``."""
    if fault not in FAULTS:
        raise ValueError(f"probsparse_triton.measure: fault must be one of {list(FAULTS)}, got {fault!r}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"probsparse_triton.measure: q [B, H, Lq, D] and k [B, H, Lk, D] expected, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if samples.dim() != 2 or samples.shape[0] != q.shape[2] or samples.device != q.device:
        raise ValueError(f"probsparse_triton.measure: samples must be [Lq, U] on q's device, got "
                         f"{tuple(samples.shape)} on {samples.device}")
    if samples.shape[1] == 0:
        raise ValueError("probsparse_triton.measure: samples must hold at least one key per query")
    batch, heads, seq_q, dim = q.shape
    out = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    q, k = q.detach(), k.detach()
    bd = min(block_d, max(16, triton.next_power_of_2(dim)))
    grid = (triton.cdiv(seq_q, block_r), batch * heads)
    n_samples = 1 if fault == "first_sample" else samples.shape[1]  # the negative control reads sample 0 only
    jit_kernel(_measure_src)[grid](
        q, k, samples, out, seq_q, k.shape[2], n_samples, heads, *q.stride(), *k.stride(), *samples.stride(),
        D=dim, BR=block_r, BD=bd, ND=triton.cdiv(dim, bd), FAULT=FAULTS[fault],
        U_INTERP=n_samples if interpreting() else 0, num_warps=num_warps)
    return out
