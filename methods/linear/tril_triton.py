"""The inverse of a batch of small unit lower-triangular matrices in one Triton kernel: ``solve: triton`` of the
delta rules (delta_rule, gated_delta_rule; methods/linear/gated_delta.py). Imported lazily by the builder:
importing this module imports triton.

The WY form of the delta rules solves, for every chunk of C tokens, the unit lower-triangular system
``(I + A) [U | W] = rhs`` with ``A`` strictly lower (``A[r, i] = β_r e^(γ_r−γ_i) k_r·k_i`` for i < r,
:func:`gated_delta.chunk_pieces`). ``solve: torch`` calls ``torch.linalg.solve_triangular`` on all chunks at once
(on CUDA a batched trsm over thousands of C x C systems: 8192 at 32K tokens, 16 heads, C = 64). ``solve: triton``
instead computes ``T = (I + A)⁻¹`` here, one program per matrix, and the caller multiplies ``T @ rhs`` (one
batched matmul), as fla's chunked kernels do.

Kernel (:func:`_inverse_src`, grid ``(number of matrices,)``): forward substitution in registers. ``T`` is a
``[BC, BC]`` fp32 register tile (BC: C rounded up to a power of two >= 16; the padding rows and columns stay
0 and are not stored), zero at the start; for i = 0 .. C−1 in order

    T[i, :] = e_i − Σ_{j<i} A[i, j] T[j, :]

(row i of ``(I + A) T = I``: ``T[i, :] + Σ_{j<i} A[i, j] T[j, :] = e_i``). Only rows j < i of T are read and
they are final by then; row i of A is loaded with the mask j < i, so whatever lies on or above A's diagonal in
memory is never read. The sum is an elementwise product with the tile and a reduction over its rows; the new
row replaces row i with ``tl.where``. C steps of O(C²) work each: O(C³) per matrix, as the triangular solve's
O(C² (dv + dk)) is when dv + dk >= C. Row i + 1 of A is loaded while row i is computed (a one-row prefetch:
each step would otherwise wait for its load). Everything is fp32 (no ``tl.dot``, so no tf32 rounding).

Autograd (:class:`_TrilInverse`): ``T = (I + A)⁻¹`` so ``dT = −T dA T`` and the gradient of a loss is

    dA = −Tᵀ · dT · Tᵀ

(two batched fp32 matmuls in PyTorch). It is the gradient for a dense A; it is not masked to the strictly lower
part that the kernel reads (``torch.linalg.solve_triangular``'s backward masks it with ``tril``). The caller in
:func:`gated_delta.chunk_pieces` needs no mask: its ``A`` is ``β_r (k_r·k_i) · strict`` with ``strict`` the
decay matrix with every entry on or above the diagonal exactly 0 (``exp(−inf)`` above, ``masked_fill`` on the
diagonal), so the backward of that product multiplies the upper part of ``dA`` by 0 before it reaches β, k or
the gate (the decay's own backward ``d(decay) · decay`` is 0 there too): the gradients of the method's inputs
are the same as with the mask, and one pass over ``[B, H, N, C, C]`` is saved. A standalone caller whose A has
differentiable entries on or above the diagonal must mask (``dA.tril(-1)``) itself.

Shapes: ``A`` ``[..., C, C]`` fp32 (any leading dims, read through its last two strides; the leading dims are
flattened, which copies only when they are not contiguous), C <= :data:`MAX_CHUNK` (128: the tile is
C² / (32 · num_warps) registers per thread, 64 at 8 warps). Warps: :func:`warps` (C/16, 1..8). Compiled offline
for sm_90 (methods/triton_fit.py, ``ptxas -v``; tests/test_triton_fit.py holds it to the shared-memory limit):
shared memory 0.5 / 1 / 2 / 4 KB (the reduction's scratch) at C = 16 / 32 / 64 / 128; registers per thread at
the default warps 64 (C 16, 1 warp), 65 (32, 2), 126 (64, 4), 243 (128, 8), no spills (C 64 at 8 warps: 79;
C 128 spills below 8 warps). Not yet timed on the H200: the warps are a guess from these counts.

``skip_step`` (a row index, default −1: none) leaves row ``skip_step`` of T as ``e_i`` without the sum: a
deliberately broken variant for the tests' negative control. Kernels are decorated on first use, once per
interpreter mode (linear_triton.jit_kernel); CUDA or ``TRITON_INTERPRET=1``.
"""

import torch
import triton
import triton.language as tl

from .linear_triton import _block, jit_kernel

MAX_CHUNK = 128


def _inverse_src(A, T, sab, sar, sac, C: tl.constexpr, BC: tl.constexpr, SKIP: tl.constexpr):
    """One program inverts one matrix: ``T[m] = (I + strictly_lower(A[m]))⁻¹`` (``T`` contiguous
    ``[M, C, C]``; ``A[m, r, c]`` at ``A + m·sab + r·sar + c·sac``)."""
    m = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BC)  # the row index j of T (and the column index j of A's row i)
    cols = tl.arange(0, BC)  # T's column index
    a_base = A + m * sab
    T_tile = tl.zeros([BC, BC], dtype=tl.float32)
    a_next = tl.zeros([BC], dtype=tl.float32)  # row 0 of A: nothing below the diagonal
    for i in range(0, C):
        a_row = a_next  # A[i, j] for j < i, else 0 (indexed by j along the tile's rows)
        a_next = tl.load(a_base + (i + 1) * sar + rows * sac, mask=(rows < i + 1) & (i + 1 < C), other=0.0)
        acc = tl.sum(a_row[:, None] * T_tile, axis=0)  # Σ_j A[i, j] T[j, :]; rows j >= i of T are still 0
        if SKIP >= 0:  # the negative control: row SKIP without its substitution
            acc = tl.where(i == SKIP, 0.0, acc)
        new = tl.where(cols == i, 1.0, 0.0) - acc  # e_i − Σ_j A[i, j] T[j, :]
        T_tile = tl.where(rows[:, None] == i, new[None, :], T_tile)
    mask = (rows[:, None] < C) & (cols[None, :] < C)
    tl.store(T + m * (C * C) + rows[:, None] * C + cols[None, :], T_tile, mask=mask)


def warps(chunk: int) -> int:
    """Warps per program: C/16 (1 at 16, 4 at 64, 8 at 128): the [BC, BC] tile at 8 fp32 values per thread
    up to C = 64, 64 at C = 128 (chosen by the tile's size, not timed)."""
    return max(1, min(8, _block(chunk) // 16))


def inverse_forward(A: torch.Tensor, *, skip_step: int = -1) -> torch.Tensor:
    """``(I + strictly_lower(A))⁻¹`` for ``A`` ``[..., C, C]`` fp32 by the kernel (no autograd): a new
    contiguous fp32 tensor of A's shape, unit lower-triangular (zeros above the diagonal)."""
    if A.dtype != torch.float32:
        raise TypeError(f"tril_triton.tril_inverse: A must be float32, got {A.dtype}")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"tril_triton.tril_inverse: A must be [..., C, C], got {tuple(A.shape)}")
    chunk = A.shape[-1]
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"tril_triton.tril_inverse: C must be in 1..{MAX_CHUNK}, got {chunk}")
    flat = A.reshape(-1, chunk, chunk)
    T = torch.empty(flat.shape, device=A.device, dtype=torch.float32)
    if flat.shape[0]:
        jit_kernel(_inverse_src)[(flat.shape[0],)](flat, T, *flat.stride(), C=chunk, BC=_block(chunk),
                                                   SKIP=int(skip_step), num_warps=warps(chunk))
    return T.view(A.shape)


class _TrilInverse(torch.autograd.Function):
    """``T = (I + A)⁻¹`` (A strictly lower) by the kernel; backward ``dA = −Tᵀ dT Tᵀ``, unmasked (see the
    module docstring for why :func:`gated_delta.chunk_pieces` needs no mask). Saves T only."""

    @staticmethod
    def forward(ctx, A, skip_step):
        T = inverse_forward(A, skip_step=skip_step)
        ctx.save_for_backward(T)
        return T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dT):
        (T,) = ctx.saved_tensors
        Tt = T.transpose(-1, -2)
        return -(Tt @ dT @ Tt), None


def tril_inverse(A: torch.Tensor, *, skip_step: int = -1) -> torch.Tensor:
    """``(I + A)⁻¹`` for strictly lower ``A`` ``[..., C, C]`` (fp32; entries on or above the diagonal are
    ignored), differentiable in A (unmasked gradient: see the module docstring). CUDA or
    ``TRITON_INTERPRET=1``."""
    return _TrilInverse.apply(A, skip_step)
