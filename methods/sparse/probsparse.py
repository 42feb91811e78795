"""ProbSparse self-attention (Informer; Zhou et al., AAAI 2021, arXiv:2012.07436), from CAB's efficient set.

Only the "active" queries attend; the rest take the mean of the values. Per (batch, head):

1. every query scores ``U = factor * ceil(ln Lk)`` keys drawn at random (one draw per query, shared by
   batch and heads, as Informer's ``_prob_QK``); its sparsity measurement is
   ``M(q_i) = max_j(q_i k_j) - sum_j(q_i k_j) / Lk`` over those samples;
2. the ``u = factor * ceil(ln Lq)`` queries with the largest ``M`` attend to every key (softmax);
3. every other query's output is ``mean(V)``.

The random key draws are made in the untimed preparation (seeded); the measurement and top-u are the method
(timed, the ``routing`` phase), from fp32 scores shared by fast path and reference. Non-causal only (as in
CAB): the causal decoder form of Informer fills the others with ``cumsum(V)`` and picks queries with
scores over future keys. Cross attention is fine.

Fast path: the u active queries gathered, one SDPA call against all keys (cuDNN first), scattered into the
``mean(V)`` background. O(L log L) work. Options: ``factor`` (5), ``measure`` (``auto``, the default: ``triton``
on a CUDA device where the kernel runs, else ``torch``; ``torch``: the sampled keys gathered in fp32,
:func:`measurements`; ``triton``: one kernel reading each sampled key row once, :mod:`probsparse_triton`, CUDA or
``TRITON_INTERPRET=1``, else the case is ``unsupported`` naming the field; ``fn.resolved`` says which ran).
Measured on the H200 (full, 16 heads, d 128, bf16): fwd 4.11 / 23.8 / 114 ms at 64K / 256K / 1M with ``triton``
(results/h200-probsparse-triton) against 79.3 / 350 / 1,520 ms with ``torch`` (results/h200-sparse), fwd_bwd
132.6 ms at 1M (``torch``: oom); the measurement is still 85 % of the 1M forward. The reference always measures with PyTorch, so the gate compares the same routing up to
fp32 summation order (a near-tie at the u-th place could differ).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..registry import Capabilities, Unsupported, register_method
from .common import Options, pattern_reference, row_chunks, sdpa_tiles


MEASURES = ("torch", "triton")  # the sparsity measurement of the fast path (the reference's is always torch)


def sample_counts(seq_q: int, seq_kv: int, factor: int) -> tuple[int, int]:
    """(keys sampled per query, active queries)."""
    return min(factor * math.ceil(math.log(seq_kv)), seq_kv), min(factor * math.ceil(math.log(seq_q)), seq_q)


def measurements(q, k, samples: torch.Tensor) -> torch.Tensor:
    """The sparsity measurement ``M [B, H, Lq]`` (fp32) of every query on its sampled keys ``samples [Lq, U]``:
    the sampled keys gathered (fp32) in query chunks, readable."""
    batch, heads, seq_q, dim = q.shape
    seq_kv = k.shape[2]
    measure = []
    for chunk in row_chunks(torch.arange(seq_q, device=q.device), batch * heads * samples.shape[1] * dim):
        keys = k[:, :, samples[chunk]].float()  # [B, H, R, U, D]
        scores = torch.einsum("bhrd,bhrud->bhru", q[:, :, chunk].float(), keys)
        measure.append(scores.amax(dim=-1) - scores.sum(dim=-1) / seq_kv)
    return torch.cat(measure, dim=2)


def active_queries(q, k, samples: torch.Tensor, top_u: int, measure=None) -> torch.Tensor:
    """Indices ``[B, H, u]`` (ascending) of the queries with the largest sparsity measurement (``measure``:
    :func:`measurements`, the default, or :func:`probsparse_triton.measure`)."""
    values = (measurements if measure is None else measure)(q, k, samples)
    return values.topk(top_u, dim=-1).indices.sort(dim=-1).values


@register_method(
    "probsparse",
    Capabilities(family="sparse", exact=False, masks={"full"}, cross=True, backward=True),
    description="Informer ProbSparse: top-u queries by a sampled sparsity measurement attend, the rest take "
                "mean(V) (SDPA on the active queries)",
    options=("factor", "measure"),
)
def build_probsparse(ctx):
    case = ctx.case
    opts = Options(ctx, "probsparse")
    factor = opts.int("factor", 5, minimum=1)
    measure_impl = opts.choice("measure", "auto", ("auto",) + MEASURES)
    n_samples, top_u = sample_counts(case.seq_q, case.seq_kv, factor)
    fast_measure = None  # measurements(), PyTorch
    from ..linear.linear_attn import triton_by_default, triton_runnable

    if measure_impl == "auto":  # the kernel on a CUDA device where it runs (measured faster), else PyTorch
        measure_impl = "triton" if triton_by_default(ctx.device) else "torch"
    if measure_impl == "triton":
        why = triton_runnable(ctx.device)
        if why:
            raise Unsupported(f"probsparse with method_options.probsparse.measure=triton: {why}")
        from .probsparse_triton import measure as fast_measure

    def prepare(q, k, v):
        gen = torch.Generator(device="cpu").manual_seed(case.seed * 104729 + 5)
        return {"samples": torch.randint(case.seq_kv, (case.seq_q, n_samples), generator=gen).to(q.device)}

    def routing(q, k, v, samples):  # the fast path's (and the routing phase's): the chosen measurement
        return active_queries(q, k, samples, top_u, fast_measure)

    def fn(q, k, v, samples):
        active = routing(q, k, v, samples)  # [B, H, u]
        index = active[..., None].expand(-1, -1, -1, q.shape[-1])
        picked = sdpa_tiles(q.gather(2, index), k, v)
        background = v.mean(dim=2, keepdim=True).expand(-1, -1, q.shape[2], -1)
        return background.scatter(2, index, picked)

    def reference(q, k, v, samples, rows=None):
        active = active_queries(q, k, samples, top_u)  # always the readable PyTorch measurement
        idx = torch.arange(q.shape[2], device=q.device) if rows is None else rows.to(q.device)
        is_active = (active[..., None] == idx).any(dim=2)  # [B, H, R]
        attended = pattern_reference(  # every key visible to an active query: plain softmax, chunked
            q, k, v, lambda chunk: torch.ones(1, 1, chunk.numel(), k.shape[2], dtype=torch.bool, device=q.device),
            idx)
        return torch.where(is_active[..., None], attended, v.mean(dim=2, keepdim=True))

    fn.resolved = {"measure": measure_impl}
    pairs = case.batch * case.heads_q * top_u * case.seq_kv
    return Prepared(fn=fn, reference=reference, prepare=prepare, phases={"routing": routing},
                    attended_pairs=lambda q, k, v, samples: pairs)
