"""Nyströmformer (Xiong et al., AAAI 2021, arXiv:2102.03902): softmax attention through m landmarks.

Landmarks are segment means of q and of k (``m`` contiguous segments, ``torch.tensor_split``: uneven
lengths allowed). ``F = softmax(Q K̃ᵀ/√d)``, ``A = softmax(Q̃ K̃ᵀ/√d)``, ``B = softmax(Q̃ Kᵀ/√d)``,
``out = F · A⁺ · (B V)`` with A⁺ from the paper's iterative Newton–Schulz pseudo-inverse
(``Z₀ = Aᵀ/(‖A‖₁‖A‖∞)``, ``Z ← ¼ Z(13I − AZ(15I − AZ(7I − AZ)))``, ``iters`` times). Class A:
``approx_err`` recorded. Noncausal only (landmarks pool the whole sequence); cross attention works (q and k
landmarks are taken separately). The fast path is batched; the reference builds the segment-mean operator
as an explicit averaging matrix. fp32 inside. Hyper-parameters: ``landmarks`` (default 64; at most the
sequence length), ``iters`` (default 6). The paper's depthwise-conv skip on V is not included.
"""
from __future__ import annotations

import math

import torch

from ..contract import Prepared
from ..fitting import fits_length
from ..registry import Capabilities, Unsupported, register_method
from .common import expand_heads, param_int


def iterative_pinv(A, iters: int):
    eye = torch.eye(A.shape[-1], device=A.device, dtype=A.dtype)
    col = A.abs().sum(-2).amax(-1, keepdim=True)[..., None]
    row = A.abs().sum(-1).amax(-1, keepdim=True)[..., None]
    Z = A.transpose(-1, -2) / (col * row)
    for _ in range(iters):
        AZ = A @ Z
        Z = 0.25 * Z @ (13 * eye - AZ @ (15 * eye - AZ @ (7 * eye - AZ)))
    return Z


def segment_means(x: torch.Tensor, segments: int) -> torch.Tensor:
    """[..., L, D] -> [..., segments, D]: the means of ``torch.tensor_split``'s contiguous segments along dim 2,
    in one reduction (a view's mean when they are even, else one ``index_add``). Not a mean per segment: their
    backward wrote one full-size gradient per segment (64 at the default), which made the H200's fwd_bwd
    superlinear (slope 1.45 from 128K to 1M, `results/h200-linear-long`)."""
    length = x.shape[2]
    if length % segments == 0:
        return x.unflatten(2, (segments, length // segments)).mean(3)
    base, extra = divmod(length, segments)  # tensor_split: the first `extra` segments have base + 1 tokens
    sizes = torch.full((segments,), base, device=x.device, dtype=torch.long)
    sizes[:extra] += 1
    ids = torch.repeat_interleave(torch.arange(segments, device=x.device), sizes)
    sums = x.new_zeros(*x.shape[:2], segments, x.shape[3]).index_add(2, ids, x)
    return sums / sizes.to(x.dtype)[:, None]


def nystrom_fast(q, k, v, landmarks: int, iters: int):
    dtype = q.dtype
    qf, kf, vf = q.float(), expand_heads(k, q.shape[1]).float(), expand_heads(v, q.shape[1]).float()
    scale = 1.0 / math.sqrt(q.shape[-1])
    ql, kl = segment_means(qf, landmarks), segment_means(kf, landmarks)
    F_ = torch.softmax(qf @ kl.transpose(-1, -2) * scale, -1)
    A = torch.softmax(ql @ kl.transpose(-1, -2) * scale, -1)
    B = torch.softmax(ql @ kf.transpose(-1, -2) * scale, -1)
    return (F_ @ (iterative_pinv(A, iters) @ (B @ vf))).to(dtype)


def averaging_matrix(length: int, segments: int, device) -> torch.Tensor:
    """[segments, length]: row s averages the tokens of segment s (tensor_split's segment sizes)."""
    sizes = [len(part) for part in torch.tensor_split(torch.arange(length), segments)]
    rows = torch.zeros(segments, length, device=device)
    start = 0
    for index, size in enumerate(sizes):
        rows[index, start:start + size] = 1.0 / size
        start += size
    return rows


def nystrom_reference(q, k, v, landmarks: int, iters: int, rows=None):
    """``rows``: only those query rows of the output (the harness's sample at long lengths; landmarks still pool
    every token). The product runs right to left, ``F · (A⁺ · (B · V))``: never an [L, L] matrix (left to right,
    ``F · A⁺ · B`` is one: 1 TiB at 128K tokens and 16 heads, an H200 `oom` in the ninth session)."""
    k, v = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1])
    q_land = averaging_matrix(q.shape[2], landmarks, q.device).to(q.dtype) @ q
    k_land = averaging_matrix(k.shape[2], landmarks, k.device).to(k.dtype) @ k
    q_rows = q if rows is None else q[:, :, rows]
    kernel_q = torch.softmax(q_rows @ k_land.transpose(-1, -2) * scale, -1)
    kernel_a = torch.softmax(q_land @ k_land.transpose(-1, -2) * scale, -1)
    kernel_k = torch.softmax(q_land @ k.transpose(-1, -2) * scale, -1)
    return kernel_q @ (iterative_pinv(kernel_a, iters) @ (kernel_k @ v))


LANDMARKS = 64  # the default


@fits_length("nystromformer")
def fit_nystromformer(seq_q: int, seq_kv: int, causal: bool, given: dict) -> dict:
    """More default landmarks than the shorter sequence has tokens: a landmark per 4 tokens of it."""
    shortest = min(seq_q, seq_kv)
    if "landmarks" in given or LANDMARKS <= shortest:
        return {}
    return {"landmarks": max(1, shortest // 4)}


@register_method("nystromformer", Capabilities(family="linear", exact=False, masks={"full"}, cross=True, gqa=True,
                                                backward=True), options=("landmarks", "iters"))
def build_nystromformer(ctx):
    """Nystromformer: landmark (segment-mean) approximation with an iterative pseudo-inverse (full mask)."""
    landmarks = param_int(ctx, "landmarks", LANDMARKS, minimum=1)
    iters = param_int(ctx, "iters", 6, minimum=0, maximum=100)
    shortest = min(ctx.case.seq_q, ctx.case.seq_kv)
    if landmarks > shortest:
        raise Unsupported(f"method_options.nystromformer.landmarks={landmarks} exceeds the sequence length {shortest}")
    return Prepared(fn=lambda q, k, v: nystrom_fast(q, k, v, landmarks, iters),
                    reference=lambda q, k, v, rows=None: nystrom_reference(q, k, v, landmarks, iters, rows))
