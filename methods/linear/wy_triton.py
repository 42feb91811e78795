"""The delta rules' per-chunk WY pieces in one Triton kernel: ``solve: fused`` of delta_rule, gated_delta_rule
(and simple_gla, without the delta term) in methods/linear/gated_delta.py. Imported lazily by the builder:
importing this module imports triton.

What it replaces. :func:`gated_delta.chunk_pieces` builds, for all chunks at once in PyTorch fp32, from the
prepared inputs (fp32, q and k ℓ2-normalised, padded to whole chunks)

    γ = cumsum of the log gate g within the chunk,   decay[r, i] = e^(γ_r−γ_i) for i <= r (else 0),
    attn = (q kᵀ) ⊙ decay,   qg = diag(e^γ) q,   kd = diag(e^(γ_C−γ)) k,   last = e^(γ_C),
    A[r, i] = β_r (k_r·k_i) e^(γ_r−γ_i) for i < r,   (I + A) [U | W] = diag(β) [V | diag(e^γ) K]

(without the delta term: ``U = diag(β) V``, no W), about thirty launches over [B, H, N, C, C] and
[B, H, N, C, d] tensors (the profile at 32K tokens, 16 heads, d 128 on the H200,
results/h200-linear-profile: 3.3 ms of elementwise kernels and a 3.2 ms batched trsm of the 13.4 ms forward),
and ``chunked`` converts, normalises and pads the inputs before it (a few more passes). Here one program per
(batch·head, chunk) computes all of it from the raw inputs and writes the six pieces once:

1. ``β`` and ``g`` of the chunk's C tokens (masked past the sequence's end: padded tokens have g = 0, β = 0,
   q = k = v = 0, as ``chunked`` pads); ``γ = cumsum(g)``, ``γ_C = Σ g``; ``last = e^(γ_C)``.
2. With ``normalize``: the row norms of q and k (one pass over the head dim), as ``F.normalize``
   (``x / max(‖x‖, 1e-12)``); the inputs may be fp32, bf16 or fp16 (read as they are, computed in fp32).
3. One pass over the head dim in blocks of ``block_k``: ``q kᵀ`` and ``k kᵀ`` accumulated with ``tl.dot``;
   ``qg`` and ``kd`` of the block stored on the way.
4. ``attn = (q kᵀ) ⊙ decay`` stored. ``A`` (strictly lower, from ``k kᵀ``, β and γ) and ``T = (I + A)⁻¹``
   blocked by 16 x 16 tiles (NB = BC / 16 blocks; C is padded to BC with zero rows and columns of A, so
   every C goes this way and T is the identity on the padding): (a) the NB diagonal blocks
   ``Tᵢᵢ = (I + Aᵢᵢ)⁻¹`` at once by forward substitution on one ``[NB, 16, 16]`` tile (``A``'s diagonal blocks,
   taken out of the ``[BC, BC]`` tile by a reshape to ``[NB, 16, NB, 16]`` and a masked sum): 16 steps, step s
   ``Tᵢᵢ[s, :] = e_s − Σ_{j<s} Aᵢᵢ[s, j] Tᵢᵢ[j, :]`` for every i, fp32 without dots, O(16 · C) per step;
   (b) the off-diagonal blocks, the block forward substitution ``Tᵢⱼ = −Tᵢᵢ Σ_{j<=m<i} Aᵢₘ Tₘⱼ``, written
   with ``D = blockdiag(Tᵢᵢ)``, ``Lb`` the strictly block-lower part of A and ``N = D Lb`` (``I + A =
   (I + blockdiag(Aᵢᵢ)) (I + N)``, N strictly block-lower, ``N^NB = 0``) as ``T = (I + N)⁻¹ D``: ``P ← D − N P``
   from ``P = D``, NB − 1 times (after step s the block band s below the diagonal is final: the Neumann
   series of a nilpotent N ends, so this is the inverse, not an approximation). NB ``[BC, BC] x [BC, BC]`` dots
   (N and the NB − 1 steps; C = 64: 4), O(NB · C³) multiply-adds, on tensor cores with ``tf32x3`` / ``tf32``. This replaced (results/
   h200-linear-profile-fused: ``_wy_src`` 6.0 ms of the 10.1 ms delta_rule forward at 32K tokens, 16 heads,
   d 128, C 64) the forward substitution over all C rows in registers: C sequential steps of masked [C, C]
   reductions, O(C³) fp32 without ``tl.dot``, and ieee dots elsewhere.
5. ``U = T (β v)`` in blocks of ``block_v`` value columns and ``W = T (β e^γ k)`` in blocks of ``block_k``
   (``tl.dot``), stored.

So the pieces cost one launch, one read of v and q and two of k (one more of q and k with ``normalize``: the
norms' pass, the chunk's rows L2-resident after), and one write of each piece. The loop over chunks (``impl``:
PyTorch or delta_triton.py) and the outputs (``chunk_outputs``, PyTorch) are unchanged.

Dots (q kᵀ, k kᵀ: one each per ``block_k`` columns; the inverse: NB; U, W: one each per ``block_v`` /
``block_k`` columns): ``dot_precision`` ``tf32x3`` (the default since the blocked inverse: fp32-like accuracy on
tensor cores, three tf32 products, ~2⁻²¹ relative rounding per product against fp32's 2⁻²⁴), ``ieee`` (full
fp32 FMA dots, as the PyTorch path's fp32 matmuls; the default before: at C = 64 the inverse's [64, 64] x
[64, 64] FMA dots spill a little, see :data:`DEFAULTS`) or ``tf32`` (one tf32 product, ~1e-3 relative rounding
in q kᵀ, k kᵀ, the inverse's and U, W's products). Under ``TRITON_INTERPRET=1`` every dot is a numpy fp32
matmul whatever the precision, so the tests (fp32 tolerances) check the algebra, not tf32x3's rounding on the
GPU.

Shapes: any C <= :data:`MAX_CHUNK` (the [C, C] tiles live in registers; C is padded to a power of two >= 16
with masks), any head dims (blocked), the length need not be a multiple of C (the last chunk is padded in registers; the pieces
have ``cdiv(L, C)`` chunks, as ``chunk_pieces`` has on the padded inputs). Outputs are new contiguous fp32
tensors: ``qg`` ``[B, H, N, C, dk]``, ``attn`` ``[B, H, N, C, C]``, ``U`` ``[B, H, N, C, dv]``, ``W``
``[B, H, N, C, dk]`` (None without the delta term), ``kd`` ``[B, H, N, C, dk]``, ``last`` ``[B, H, N]``.
Resources (methods/triton_fit.py, compiled offline for sm_90; tests/test_triton_fit.py holds them to the H200's
shared memory and its defaults to no spills): see :data:`DEFAULTS`.

Autograd (:class:`_WYPieces`): the forward saves its inputs only. Its backward, by ``backward``
(``method_options.<method>.wy_backward``, gated_delta.solve_choice): ``torch`` (the default) recomputes the
pieces with the PyTorch code (:func:`reference_pieces`: conversion, normalisation, padding and
``chunk_pieces(solve='torch')``) under ``enable_grad`` and backpropagates through it, so the gradients are the
PyTorch path's (the backward costs one PyTorch forward of the pieces more than ``solve: torch``'s, which keeps
that graph from the forward; on the H200 at 32K tokens, 16 heads, d 128, most of delta_rule's 44.8 ms fwd_bwd,
results/h200-linear-profile-fused). ``triton``: one more kernel, :func:`pieces_backward` (``_wy_bwd_src``), one
program per (batch·head, chunk) as the forward: it recomputes γ, k̂ k̂ᵀ, A and T (the same blocked inverse,
the code repeated) in registers, takes the six pieces' incoming gradients and writes dq, dk, dv, dg, dβ (the
formulas in its docstring; dA = −Tᵀ dT Tᵀ as two [C, C] dots, dT accumulated over the head dims so that no
U or W is recomputed; the normalisation's row dots from the [C, C] tiles). Its reads: k four times (five with
``normalize``), q three times, v, the pieces' gradients once (dW and dkd twice); its β e^γ Tᵀ dW part of dk is
written to dk's output and read back by the last pass (a barrier between). ``chunk`` <= 64 (C = 128 needs
~296 KB of shared memory). Not yet timed on a GPU.

``fault`` (tests only, the negative controls): ``'transpose_t'`` uses ``Tᵀ`` for U and W, ``'no_beta'``
leaves β out of the right-hand side, ``'no_offdiag'`` keeps the diagonal blocks of T only (no merge; C <= 16 has
one block, so nothing changes there). The backward's (``backward_fault``): ``'no_dinv'`` drops dA,
``'no_revcumsum'`` writes dg without the reverse cumsum, ``'no_norm_proj'`` leaves the normalisation's projection
out. Kernels are decorated on first use, once per interpreter mode (linear_triton.jit_kernel); CUDA or
``TRITON_INTERPRET=1``.
"""

import torch
import triton
import triton.language as tl

from .linear_triton import _block, jit_kernel

MAX_CHUNK = 128
# The backward kernel compiles up to C = 64 (at C = 128: ~296 KB of shared memory, tf32x3, d 128, over the H200's);
# it runs on a GPU up to C = 32: at C = 64 (8 warps, tf32x3: spills ~0.6 KB a thread) the H200 gave wrong gradients
# that differ from run to run (delta_rule dk rel_err 0.24 / 0.19, gated dk 2e2 / 3e2 against autograd, where the
# interpreter agrees to 1e-5; C = 32 and 16 right to 5e-5: scripts/wy_backward_check.py, console logs in
# results/h200-linear-delta-fused-v3/device-logs/s12/; the method's gate: h200-linear-delta-fused-v2/-v3)
MAX_BACKWARD_CHUNK = 32
COMPILE_BACKWARD_CHUNK = 64  # what pieces_backward takes off the GPU (the interpreter, ptxas studies)
PRECISIONS = ("ieee", "tf32", "tf32x3")
FAULTS = {None: 0, "transpose_t": 1, "no_beta": 2, "no_offdiag": 3}
BACKWARDS = ("torch", "triton")  # _WYPieces.backward: the PyTorch recompute, or the kernel _wy_bwd_src
BACKWARD_FAULTS = {None: 0, "no_dinv": 1, "no_revcumsum": 2, "no_norm_proj": 3}


def _wy_src(Q, K, V, G, BETA, QG, ATTN, U, W, KD, LAST, L, N, H,
            sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sgb, sgh, sgl, sbb, sbh, sbl,
            C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
            BV: tl.constexpr, HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, DELTA: tl.constexpr,
            NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, FAULT: tl.constexpr, NB: tl.constexpr):
    """One program: the pieces of chunk ``c`` of head ``bh`` (program id ``bh · N + c``, which is also the
    chunk's index in the contiguous outputs)."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // N
    c = pid % N
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BC)  # token r of the chunk (the tiles' row index)
    cols = tl.arange(0, BC)  # token i of the chunk (the [C, C] tiles' column index)
    tok = c * C + rows
    live = (rows < C) & (tok < L)  # real tokens; the rest read as 0 (g = β = 0: no write, no decay)
    stored = rows < C  # rows of the outputs (the padded tokens of the last chunk included, as chunk_pieces)

    # 1. gates: β, γ = cumsum(g) within the chunk, the chunk's total log-decay γ_C
    if HAS_BETA:
        beta = tl.load(BETA + b * sbb + h * sbh + tok * sbl, mask=live, other=0.0).to(tl.float32)
    else:
        beta = tl.where(live, 1.0, 0.0)
    if HAS_G:
        g = tl.load(G + b * sgb + h * sgh + tok * sgl, mask=live, other=0.0).to(tl.float32)
        gam = tl.cumsum(g, axis=0)
        gam_last = tl.sum(g, axis=0)
    else:
        gam = tl.zeros([BC], dtype=tl.float32)
        gam_last = tl.sum(gam, axis=0)
    tl.store(LAST + pid, tl.exp(gam_last))

    q_base = Q + b * sqb + h * sqh + tok[:, None] * sql
    k_base = K + b * skb + h * skh + tok[:, None] * skl
    v_base = V + b * svb + h * svh + tok[:, None] * svl
    out_rows = pid * C + rows  # the row of each token in the [B·H·N·C, ...] views of the outputs

    # 2. ℓ2 norms of q and k rows (F.normalize: x / max(‖x‖, eps))
    q_scale = tl.full([BC], 1.0, tl.float32)
    k_scale = tl.full([BC], 1.0, tl.float32)
    if NORMALIZE:
        q_sq = tl.zeros([BC], dtype=tl.float32)
        k_sq = tl.zeros([BC], dtype=tl.float32)
        for d0 in range(0, DK, BK):
            d = d0 + tl.arange(0, BK)
            m = live[:, None] & (d < DK)[None, :]
            qb = tl.load(q_base + d[None, :] * sqd, mask=m, other=0.0).to(tl.float32)
            kb = tl.load(k_base + d[None, :] * skd, mask=m, other=0.0).to(tl.float32)
            q_sq += tl.sum(qb * qb, axis=1)
            k_sq += tl.sum(kb * kb, axis=1)
        q_scale = 1.0 / tl.maximum(tl.sqrt(q_sq), 1e-12)
        k_scale = 1.0 / tl.maximum(tl.sqrt(k_sq), 1e-12)

    # 3. q kᵀ and k kᵀ over the head dim; qg = e^γ q and kd = e^(γ_C−γ) k stored on the way
    qk = tl.zeros([BC, BC], dtype=tl.float32)
    kk = tl.zeros([BC, BC], dtype=tl.float32)
    for d0 in range(0, DK, BK):
        d = d0 + tl.arange(0, BK)
        m = live[:, None] & (d < DK)[None, :]
        qb = tl.load(q_base + d[None, :] * sqd, mask=m, other=0.0).to(tl.float32) * q_scale[:, None]
        kb = tl.load(k_base + d[None, :] * skd, mask=m, other=0.0).to(tl.float32) * k_scale[:, None]
        qk += tl.dot(qb, tl.trans(kb), input_precision=PRECISION)
        if DELTA:
            kk += tl.dot(kb, tl.trans(kb), input_precision=PRECISION)
        out_mask = stored[:, None] & (d < DK)[None, :]
        tl.store(QG + out_rows[:, None] * DK + d[None, :], qb * tl.exp(gam)[:, None], mask=out_mask)
        tl.store(KD + out_rows[:, None] * DK + d[None, :], kb * tl.exp(gam_last - gam)[:, None], mask=out_mask)

    # 4. attn = (q kᵀ) ⊙ decay, decay[r, i] = e^(γ_r−γ_i) for i <= r (the exponent is <= 0 there; masked
    #    before exp elsewhere so nothing overflows)
    lower = rows[:, None] >= cols[None, :]
    decay = tl.where(lower, tl.exp(tl.where(lower, gam[:, None] - gam[None, :], 0.0)), 0.0)
    tl.store(ATTN + out_rows[:, None] * C + cols[None, :], qk * decay,
             mask=stored[:, None] & (cols < C)[None, :])

    if DELTA:
        # A[r, i] = β_r (k_r·k_i) e^(γ_r−γ_i) for i < r, else 0; Aᵀ the same built transposed (k kᵀ is symmetric)
        strict = rows[:, None] > cols[None, :]
        a = tl.where(strict, beta[:, None] * kk * decay, 0.0)
        above = cols[None, :] > rows[:, None]
        a_t = tl.where(above, beta[None, :] * kk * tl.exp(tl.where(above, gam[None, :] - gam[:, None], 0.0)), 0.0)
        # T = (I + A)⁻¹ by 16 x 16 blocks (NB = BC / 16 of them; padded rows and columns of A are 0, so T is
        # the identity there). (a) the diagonal blocks Tᵢᵢ = (I + Aᵢᵢ)⁻¹, all NB at once, by forward
        # substitution on a [NB, 16, 16] tile: 16 steps, step s gives row s of every block,
        # Tᵢᵢ[s, :] = e_s − Σ_{j<s} Aᵢᵢ[s, j] Tᵢᵢ[j, :] (the blocks of Aᵀ, so that row s of Aᵢᵢ comes out of a
        # reduction in the layout the product needs).
        blk = tl.arange(0, NB)
        r16 = tl.arange(0, 16)
        same = (blk[:, None, None, None] == blk[None, None, :, None])  # [NB, 1, NB, 1]: block i == block j
        a3_t = tl.sum(tl.where(same, tl.reshape(a_t, [NB, 16, NB, 16]), 0.0), axis=2)  # [i, j, r] = Aᵢᵢ[r, j]
        t3 = tl.zeros([NB, 16, 16], dtype=tl.float32)
        for s in range(0, 16):
            a_row = tl.sum(tl.where(r16[None, None, :] == s, a3_t, 0.0), axis=2)  # Aᵢᵢ[s, j], j on axis 1
            acc = tl.sum(a_row[:, :, None] * t3, axis=1)  # Σ_j Aᵢᵢ[s, j] Tᵢᵢ[j, :]; rows j >= s still 0
            new = tl.where(r16[None, :] == s, 1.0, 0.0) - acc
            t3 = tl.where(r16[None, :, None] == s, new[:, None, :], t3)
        # D = blockdiag(Tᵢᵢ) as a [BC, BC] tile
        D = tl.reshape(tl.where(same, t3[:, :, None, :], 0.0), [BC, BC])
        # (b) the off-diagonal blocks: with Lb the strictly block-lower part of A, I + A = (I + blockdiag(Aᵢᵢ))
        #     (I + N), N = D Lb (strictly block-lower, so N^NB = 0) and T = (I + N)⁻¹ D, evaluated by
        #     P ← D − N P from P = D, NB − 1 times: after step s, block band s of P is final
        #     (Tᵢⱼ = −Tᵢᵢ Σ_{j<=m<i} Aᵢₘ Tₘⱼ, the block forward substitution), each step one [BC, BC] tl.dot.
        if FAULT == 3:  # negative control: the diagonal blocks only, no off-diagonal merge
            T = D
        else:
            Lb = tl.where((rows // 16)[:, None] > (cols // 16)[None, :], a, 0.0)
            N = tl.dot(D, Lb, input_precision=PRECISION)
            T = D
            for _ in range(NB - 1):
                T = D - tl.dot(N, T, input_precision=PRECISION)
        if FAULT == 1:  # negative control: the transposed inverse
            T = tl.trans(T)
        coef_v = beta if FAULT != 2 else tl.where(live, 1.0, 0.0)  # FAULT 2, negative control: β left out
        coef_k = coef_v * tl.exp(gam)

    # 5. U = T (β v) (no delta term: U = β v), W = T (β e^γ k)
    for d0 in range(0, DV, BV):
        d = d0 + tl.arange(0, BV)
        vb = tl.load(v_base + d[None, :] * svd, mask=live[:, None] & (d < DV)[None, :], other=0.0).to(tl.float32)
        if DELTA:
            ub = tl.dot(T, vb * coef_v[:, None], input_precision=PRECISION)
        else:
            ub = vb * beta[:, None]
        tl.store(U + out_rows[:, None] * DV + d[None, :], ub, mask=stored[:, None] & (d < DV)[None, :])
    if DELTA:
        for d0 in range(0, DK, BK):
            d = d0 + tl.arange(0, BK)
            m = live[:, None] & (d < DK)[None, :]
            kb = tl.load(k_base + d[None, :] * skd, mask=m, other=0.0).to(tl.float32) * k_scale[:, None]
            wb = tl.dot(T, kb * coef_k[:, None], input_precision=PRECISION)
            tl.store(W + out_rows[:, None] * DK + d[None, :], wb, mask=stored[:, None] & (d < DK)[None, :])


def _wy_bwd_src(Q, K, V, G, BETA, DQG, DATTN, DU, DW, DKD, DLAST, DQ, DKO, DVO, DG, DBETA, L, N, H,
                sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sgb, sgh, sgl, sbb, sbh, sbl,
                C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, DELTA: tl.constexpr,
                NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, FAULT: tl.constexpr, NB: tl.constexpr):
    """One program: the gradients of chunk ``c`` of head ``bh`` (program id ``bh · N + c``) in q, k, v, g and
    β from the incoming gradients of its six pieces (contiguous fp32, zeros where a piece had none), the
    forward's γ, decays, A and T recomputed in registers (:func:`pieces_backward` has the formulas)."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // N
    c = pid % N
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BC)
    cols = tl.arange(0, BC)
    tok = c * C + rows
    live = (rows < C) & (tok < L)
    stored = rows < C

    # 1. gates (as the forward)
    if HAS_BETA:
        beta = tl.load(BETA + b * sbb + h * sbh + tok * sbl, mask=live, other=0.0).to(tl.float32)
    else:
        beta = tl.where(live, 1.0, 0.0)
    if HAS_G:
        g = tl.load(G + b * sgb + h * sgh + tok * sgl, mask=live, other=0.0).to(tl.float32)
        gam = tl.cumsum(g, axis=0)
        gam_last = tl.sum(g, axis=0)
    else:
        gam = tl.zeros([BC], dtype=tl.float32)
        gam_last = tl.sum(gam, axis=0)

    q_base = Q + b * sqb + h * sqh + tok[:, None] * sql
    k_base = K + b * skb + h * skh + tok[:, None] * skl
    v_base = V + b * svb + h * svh + tok[:, None] * svl
    out_rows = pid * C + rows  # each token's row in the pieces' [B·H·N·C, ...] views
    in_rows = bh * L + tok  # each token's row in the gradients' [B·H·L, ...] views

    # 2. ℓ2 norms (as the forward); q_live / k_live: the norm not clamped (F.normalize's norm has a gradient)
    q_scale = tl.full([BC], 1.0, tl.float32)
    k_scale = tl.full([BC], 1.0, tl.float32)
    q_live = tl.full([BC], 0.0, tl.float32)
    k_live = tl.full([BC], 0.0, tl.float32)
    if NORMALIZE:
        q_sq = tl.zeros([BC], dtype=tl.float32)
        k_sq = tl.zeros([BC], dtype=tl.float32)
        for d0 in range(0, DK, BK):
            d = d0 + tl.arange(0, BK)
            m = live[:, None] & (d < DK)[None, :]
            qb = tl.load(q_base + d[None, :] * sqd, mask=m, other=0.0).to(tl.float32)
            kb = tl.load(k_base + d[None, :] * skd, mask=m, other=0.0).to(tl.float32)
            q_sq += tl.sum(qb * qb, axis=1)
            k_sq += tl.sum(kb * kb, axis=1)
        q_scale = 1.0 / tl.maximum(tl.sqrt(q_sq), 1e-12)
        k_scale = 1.0 / tl.maximum(tl.sqrt(k_sq), 1e-12)
        if FAULT != 3:  # FAULT 3, negative control: the normalisation's projection left out
            q_live = tl.where(tl.sqrt(q_sq) > 1e-12, 1.0, 0.0)
            k_live = tl.where(tl.sqrt(k_sq) > 1e-12, 1.0, 0.0)

    # 3. the delta term first (its [C, C] tiles are the most; little else is live yet): k̂ k̂ᵀ, A and
    #    T = (I + A)⁻¹ as the forward (_wy_src, steps 3-4), then what needs T: dv, the dR part of dk, dA
    dbeta = tl.zeros([BC], dtype=tl.float32)
    dgam = tl.zeros([BC], dtype=tl.float32)
    k_dk = tl.zeros([BC], dtype=tl.float32)  # k̂·dk̂ (the normalisation's projection), summed as the terms come
    if DELTA:
        strict = rows[:, None] > cols[None, :]
        kk = tl.zeros([BC, BC], dtype=tl.float32)
        for d0 in range(0, DK, BK):
            d = d0 + tl.arange(0, BK)
            kb = tl.load(k_base + d[None, :] * skd, mask=live[:, None] & (d < DK)[None, :], other=0.0).to(tl.float32)
            kb = kb * k_scale[:, None]
            kk += tl.dot(kb, tl.trans(kb), input_precision=PRECISION)
        a = tl.where(strict, beta[:, None] * kk * tl.exp(tl.where(strict, gam[:, None] - gam[None, :], 0.0)), 0.0)
        # Aᵀ built transposed as the forward builds it (k kᵀ is symmetric); the build checked on the H200 at C = 16
        # and 32 (scripts/wy_backward_check.py, s12-d / s12-e; with tl.trans(a) it was checked at C = 64 only)
        above = cols[None, :] > rows[:, None]
        a_t = tl.where(above, beta[None, :] * kk * tl.exp(tl.where(above, gam[None, :] - gam[:, None], 0.0)), 0.0)
        blk = tl.arange(0, NB)
        r16 = tl.arange(0, 16)
        same = (blk[:, None, None, None] == blk[None, None, :, None])
        a3_t = tl.sum(tl.where(same, tl.reshape(a_t, [NB, 16, NB, 16]), 0.0), axis=2)
        t3 = tl.zeros([NB, 16, 16], dtype=tl.float32)
        for s in range(0, 16):
            a_row = tl.sum(tl.where(r16[None, None, :] == s, a3_t, 0.0), axis=2)
            acc = tl.sum(a_row[:, :, None] * t3, axis=1)
            new = tl.where(r16[None, :] == s, 1.0, 0.0) - acc
            t3 = tl.where(r16[None, :, None] == s, new[:, None, :], t3)
        D = tl.reshape(tl.where(same, t3[:, :, None, :], 0.0), [BC, BC])
        Lb = tl.where((rows // 16)[:, None] > (cols // 16)[None, :], a, 0.0)
        Nm = tl.dot(D, Lb, input_precision=PRECISION)
        T = D
        for _ in range(NB - 1):
            T = D - tl.dot(Nm, T, input_precision=PRECISION)
        coef_k = beta * tl.exp(gam)
        # W = T R, R = β e^γ k̂: dR = Tᵀ dW; its part of dk̂, β e^γ dR, goes to dk's output now (step 6 adds the
        # rest); dT = dW Rᵀ + dU (β v)ᵀ; R's β and γ terms from k̂·dR
        dT = tl.zeros([BC, BC], dtype=tl.float32)
        k_dr = tl.zeros([BC], dtype=tl.float32)
        for d0 in range(0, DK, BK):
            d = d0 + tl.arange(0, BK)
            m = live[:, None] & (d < DK)[None, :]
            kb = tl.load(k_base + d[None, :] * skd, mask=m, other=0.0).to(tl.float32) * k_scale[:, None]
            dwb = tl.load(DW + out_rows[:, None] * DK + d[None, :], mask=stored[:, None] & (d < DK)[None, :],
                          other=0.0)
            dr = tl.dot(tl.trans(T), dwb, input_precision=PRECISION)
            dT += tl.dot(dwb, tl.trans(kb * coef_k[:, None]), input_precision=PRECISION)
            k_dr += tl.sum(kb * dr, axis=1)
            tl.store(DKO + in_rows[:, None] * DK + d[None, :], dr * coef_k[:, None], mask=m)
        dbeta += tl.exp(gam) * k_dr
        dgam += coef_k * k_dr
        k_dk += coef_k * k_dr
        # U = T (β v): d(β v) = Tᵀ dU, dv = β d(β v), dβ += rowsum(v ⊙ d(β v))
        for d0 in range(0, DV, BV):
            d = d0 + tl.arange(0, BV)
            vb = tl.load(v_base + d[None, :] * svd, mask=live[:, None] & (d < DV)[None, :], other=0.0).to(tl.float32)
            dub = tl.load(DU + out_rows[:, None] * DV + d[None, :], mask=stored[:, None] & (d < DV)[None, :],
                          other=0.0)
            dbv = tl.dot(tl.trans(T), dub, input_precision=PRECISION)
            dT += tl.dot(dub, tl.trans(vb * beta[:, None]), input_precision=PRECISION)
            dbeta += tl.sum(vb * dbv, axis=1)
            tl.store(DVO + in_rows[:, None] * DV + d[None, :], dbv * beta[:, None],
                     mask=live[:, None] & (d < DV)[None, :])
        # dA = −Tᵀ dT Tᵀ (T = (I + A)⁻¹), on i < r (A is strictly lower)
        da = -tl.dot(tl.trans(T), tl.dot(dT, tl.trans(T), input_precision=PRECISION), input_precision=PRECISION)
        if FAULT == 1:  # negative control: the inverse's term −Tᵀ dT Tᵀ dropped
            da = tl.zeros([BC, BC], dtype=tl.float32)
        da = tl.where(strict, da, 0.0)
    else:
        # U = β v: dv = β dU, dβ = rowsum(v ⊙ dU)
        for d0 in range(0, DV, BV):
            d = d0 + tl.arange(0, BV)
            vb = tl.load(v_base + d[None, :] * svd, mask=live[:, None] & (d < DV)[None, :], other=0.0).to(tl.float32)
            dub = tl.load(DU + out_rows[:, None] * DV + d[None, :], mask=stored[:, None] & (d < DV)[None, :],
                          other=0.0)
            dbeta += tl.sum(vb * dub, axis=1)
            tl.store(DVO + in_rows[:, None] * DV + d[None, :], dub * beta[:, None],
                     mask=live[:, None] & (d < DV)[None, :])

    # 4. q kᵀ (and k kᵀ again) recomputed; the row dots q̂·dqg, k̂·dkd (qg = e^γ q̂, kd = e^(γ_C−γ) k̂)
    qk = tl.zeros([BC, BC], dtype=tl.float32)
    kk = tl.zeros([BC, BC], dtype=tl.float32)
    q_dqg = tl.zeros([BC], dtype=tl.float32)
    k_dkd = tl.zeros([BC], dtype=tl.float32)
    for d0 in range(0, DK, BK):
        d = d0 + tl.arange(0, BK)
        m = live[:, None] & (d < DK)[None, :]
        piece = out_rows[:, None] * DK + d[None, :]
        pm = stored[:, None] & (d < DK)[None, :]
        qb = tl.load(q_base + d[None, :] * sqd, mask=m, other=0.0).to(tl.float32) * q_scale[:, None]
        kb = tl.load(k_base + d[None, :] * skd, mask=m, other=0.0).to(tl.float32) * k_scale[:, None]
        qk += tl.dot(qb, tl.trans(kb), input_precision=PRECISION)
        if DELTA:
            kk += tl.dot(kb, tl.trans(kb), input_precision=PRECISION)
        q_dqg += tl.sum(qb * tl.load(DQG + piece, mask=pm, other=0.0), axis=1)
        k_dkd += tl.sum(kb * tl.load(DKD + piece, mask=pm, other=0.0), axis=1)
    eg = tl.exp(gam)
    ekd = tl.exp(gam_last - gam)
    dgam += eg * q_dqg - ekd * k_dkd
    dgam_last = tl.sum(ekd * k_dkd, axis=0) + tl.exp(gam_last) * tl.load(DLAST + pid)
    k_dk += ekd * k_dkd

    # 5. attn = (q kᵀ) ⊙ decay: d(q kᵀ) = dattn ⊙ decay; γ: rows +, columns − of dattn ⊙ attn. A[r, i] =
    #    β_r (k̂_r·k̂_i) e^(γ_r−γ_i), i < r: dβ_r, d(k̂ k̂ᵀ) = dA ⊙ β decay, γ: rows +, columns − of dA ⊙ A
    lower = rows[:, None] >= cols[None, :]
    decay = tl.where(lower, tl.exp(tl.where(lower, gam[:, None] - gam[None, :], 0.0)), 0.0)
    dattn = tl.load(DATTN + out_rows[:, None] * C + cols[None, :], mask=stored[:, None] & (cols < C)[None, :],
                    other=0.0)
    dqk = dattn * decay
    y = dqk * qk
    dgam += tl.sum(y, axis=1) - tl.sum(y, axis=0)
    q_dq = eg * q_dqg + tl.sum(y, axis=1)  # q̂·dq̂
    k_dk += tl.sum(y, axis=0)
    if DELTA:
        kkd = kk * decay  # used where da is nonzero (i < r) only
        x = da * beta[:, None] * kkd  # dA ⊙ A (= dKK ⊙ k̂k̂ᵀ)
        dgam += tl.sum(x, axis=1) - tl.sum(x, axis=0)
        k_dk += tl.sum(x, axis=1) + tl.sum(x, axis=0)  # k̂·((dKK + dKKᵀ) k̂)
        dbeta += tl.sum(da * kkd, axis=1)
        dkk = da * beta[:, None] * decay
        dkk = dkk + tl.trans(dkk)  # k̂ k̂ᵀ is symmetric: dk̂ += (dKK + dKKᵀ) k̂

    # 6. dq̂ = e^γ dqg + d(q kᵀ) k̂; dk̂ = e^(γ_C−γ) dkd + d(q kᵀ)ᵀ q̂ (+ β e^γ dR, stored in step 3, + (dKK + dKKᵀ)
    #    k̂); through the normalisation dx = (dx̂ − x̂ (x̂·dx̂)) / max(‖x‖, eps) (no projection where the norm is
    #    clamped)
    q_dq = q_dq * q_live
    k_dk = k_dk * k_live
    if DELTA:
        tl.debug_barrier()  # step 3's writes to dk's output, read back below by other threads of the program
    for d0 in range(0, DK, BK):  # dq
        d = d0 + tl.arange(0, BK)
        m = live[:, None] & (d < DK)[None, :]
        pm = stored[:, None] & (d < DK)[None, :]
        kb = tl.load(k_base + d[None, :] * skd, mask=m, other=0.0).to(tl.float32) * k_scale[:, None]
        dqb = eg[:, None] * tl.load(DQG + out_rows[:, None] * DK + d[None, :], mask=pm, other=0.0) \
            + tl.dot(dqk, kb, input_precision=PRECISION)
        if NORMALIZE:
            qb = tl.load(q_base + d[None, :] * sqd, mask=m, other=0.0).to(tl.float32) * q_scale[:, None]
            dqb = (dqb - qb * q_dq[:, None]) * q_scale[:, None]
        tl.store(DQ + in_rows[:, None] * DK + d[None, :], dqb, mask=m)
    for d0 in range(0, DK, BK):  # dk
        d = d0 + tl.arange(0, BK)
        m = live[:, None] & (d < DK)[None, :]
        pm = stored[:, None] & (d < DK)[None, :]
        out = in_rows[:, None] * DK + d[None, :]
        qb = tl.load(q_base + d[None, :] * sqd, mask=m, other=0.0).to(tl.float32) * q_scale[:, None]
        kb = tl.load(k_base + d[None, :] * skd, mask=m, other=0.0).to(tl.float32) * k_scale[:, None]
        dkb = ekd[:, None] * tl.load(DKD + out_rows[:, None] * DK + d[None, :], mask=pm, other=0.0) \
            + tl.dot(tl.trans(dqk), qb, input_precision=PRECISION)
        if DELTA:
            dkb += tl.load(DKO + out, mask=m, other=0.0) + tl.dot(dkk, kb, input_precision=PRECISION)
        if NORMALIZE:
            dkb = (dkb - kb * k_dk[:, None]) * k_scale[:, None]
        tl.store(DKO + out, dkb, mask=m)

    # 7. dg: γ = cumsum(g) within the chunk, γ_C = Σ g: dg_j = Σ_{r >= j} dγ_r + dγ_C
    if HAS_G:
        dgam = tl.where(stored, dgam, 0.0)
        if FAULT == 2:  # negative control: no reverse cumsum
            dg = dgam + dgam_last
        else:
            dg = tl.cumsum(dgam, axis=0, reverse=True) + dgam_last
        tl.store(DG + in_rows, dg, mask=live)
    if HAS_BETA:
        tl.store(DBETA + in_rows, dbeta, mask=live)


# Defaults chosen offline (methods/triton_fit.py + ptxas_usage: the kernel compiled for sm_90 at d = 128, bf16
# inputs, normalize; shared KB / registers per thread / spilled bytes per thread), the blocked inverse (the merge a
# runtime loop: unrolled, tl.static_range, its dots' operand buffers added up, 96 KB at C = 64 with tf32x3 and
# 256 KB, over the H200's 227, at C = 128). C = 64, blocks of 16, 8 warps: tf32x3 64 / 231 / 0 (d = 256: 64 /
# 231 / 0), ieee 32 / 182 / 0, tf32 32 / 120 / 0; at 4 warps ieee spills (~0.9 KB), tf32x3 at blocks of 64
# too (~0.9 KB). C = 32 and 16 (tf32x3, 4 warps): 16 / 168 / 0 and 6 / 128 / 0. C = 128 (8 warps) spills
# (tf32x3: 128 KB shared, ~1.3 KB per thread; tf32 ~0.2 KB): allowed, but slow. Before the blocked inverse
# (the forward substitution over all C rows, ieee): C = 64, 8 warps, 24 / 165 / 0; the profile above.
# Timed on the H200 with tf32x3 (results/h200-linear-delta-fused-v2, -fwdo: 3.41 of the forward's 7.5 ms at 32K);
# tf32 (`wy_precision: tf32`, the default for bf16 / fp16 inputs since): delta_rule fwd 5.19 against 7.54 ms at 32K, 170
# against 243 ms at 1M (results/h200-linear-delta-wytf32).
# The backward kernel (_wy_bwd_src, the same defaults and warps; d = 128, bf16, normalize): C = 16 6 KB / 224 / 0,
# C = 32 24 KB / 246 / 0; C = 64 spills with tf32x3 (96 KB / 255 / ~620 B: the inverse and the delta term's
# loops alone spill ~240 B; recomputing k kᵀ instead of holding it, dT instead of U and W, the delta term first:
# tried), ieee (~3 KB, 4 warps) too; tf32 52 KB / 255 / 0 (d = 256: 16 B); 16 warps: worse (128 registers).
DEFAULTS = dict(block_k=16, block_v=16, dot_precision="tf32x3")


def warps(chunk: int) -> int:
    """Warps per program: 4 up to C = 32, 8 above (the [C, C] fp32 tiles T, N, D, A, Aᵀ, q kᵀ, k kᵀ: at C = 64
    and 4 warps they spill with ieee dots; see :data:`DEFAULTS`)."""
    return 4 if _block(chunk) <= 32 else 8


def _check(q, k, v, g, beta, chunk, dot_precision, block_k, block_v, fault):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"wy_triton.wy_pieces: q, k [B, H, L, dk] and v [B, H, L, dv] expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if t is not None and t.shape != k.shape[:3]:
            raise ValueError(f"wy_triton.wy_pieces: {name} must be [B, H, L] = {tuple(k.shape[:3])}, "
                             f"got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"wy_triton.wy_pieces: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"wy_triton.wy_pieces: chunk must be in 1..{MAX_CHUNK}, got {chunk}")
    if dot_precision not in PRECISIONS:
        raise ValueError(f"wy_triton.wy_pieces: dot_precision must be one of {PRECISIONS}, got {dot_precision!r}")
    for name, block in (("block_k", block_k), ("block_v", block_v)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"wy_triton.wy_pieces: {name} must be a power of two >= 16, got {block}")
    if fault not in FAULTS:
        raise ValueError(f"wy_triton.wy_pieces: fault must be one of {list(FAULTS)}, got {fault!r}")


def pieces_forward(q, k, v, g, beta, *, delta: bool, chunk: int, normalize: bool = False,
                   dot_precision=DEFAULTS["dot_precision"], block_k=DEFAULTS["block_k"],
                   block_v=DEFAULTS["block_v"], num_warps=None, fault=None):
    """The kernel (no autograd): ``(qg, attn, U, W, kd, last)`` as :func:`gated_delta.chunk_pieces` returns
    them for these inputs converted to fp32, normalised (``normalize``) and padded to whole chunks. ``g``
    None: no gate (γ = 0); ``beta`` None: β = 1; ``delta`` False: no W (``U = β v``)."""
    _check(q, k, v, g, beta, chunk, dot_precision, block_k, block_v, fault)
    batch, heads, length, dk = k.shape
    dv = v.shape[-1]
    n = triton.cdiv(length, chunk)
    dev, f32 = k.device, torch.float32
    qg = torch.empty(batch, heads, n, chunk, dk, device=dev, dtype=f32)
    attn = torch.empty(batch, heads, n, chunk, chunk, device=dev, dtype=f32)
    U = torch.empty(batch, heads, n, chunk, dv, device=dev, dtype=f32)
    W = torch.empty(batch, heads, n, chunk, dk, device=dev, dtype=f32) if delta else None
    kd = torch.empty(batch, heads, n, chunk, dk, device=dev, dtype=f32)
    last = torch.empty(batch, heads, n, device=dev, dtype=f32)
    programs = batch * heads * n
    if programs:
        gs = g.stride() if g is not None else (0, 0, 0)
        bs = beta.stride() if beta is not None else (0, 0, 0)
        jit_kernel(_wy_src)[(programs,)](
            q, k, v, k if g is None else g, k if beta is None else beta, qg, attn, U, kd if W is None else W, kd,
            last, length, n, heads, *q.stride(), *k.stride(), *v.stride(), *gs, *bs,
            C=chunk, DK=dk, DV=dv, BC=_block(chunk), BK=min(block_k, _block(dk)), BV=min(block_v, _block(dv)),
            HAS_G=int(g is not None), HAS_BETA=int(beta is not None), DELTA=int(delta),
            NORMALIZE=int(normalize), PRECISION=dot_precision, FAULT=FAULTS[fault], NB=_block(chunk) // 16,
            num_warps=num_warps or warps(chunk))
    return qg, attn, U, W, kd, last


def reference_pieces(q, k, v, g, beta, *, delta: bool, chunk: int, normalize: bool = False):
    """The same pieces by the PyTorch code (differentiable): :func:`gated_delta._prepare` (the inputs converted
    to fp32, q and k ℓ2-normalised with ``normalize``, g = 0 / β = 1 where None, padded to whole chunks), then
    :func:`gated_delta.chunk_pieces` with ``solve='torch'``. What the backward recomputes, and what the tests
    compare the kernel with."""
    from .gated_delta import _prepare, chunk_pieces

    q, k, v, g, beta, _, _ = _prepare(q, k, v, g, beta, g is not None, beta is not None, normalize, chunk)
    return chunk_pieces(q, k, v, g, beta, delta=delta, chunk=chunk, solve="torch")


def pieces_backward(q, k, v, g, beta, dpieces, *, delta: bool, chunk: int, normalize: bool = False,
                    dot_precision=DEFAULTS["dot_precision"], block_k=DEFAULTS["block_k"],
                    block_v=DEFAULTS["block_v"], num_warps=None, fault=None):
    """The backward kernel (no autograd): ``(dq, dk, dv, dg, dbeta)`` (the inputs' dtypes; dg None without
    ``g``, dbeta None without ``beta``) of :func:`pieces_forward` for the incoming gradients ``dpieces``
    ``(dqg, dattn, dU, dW, dkd, dlast)`` (any may be None: zero). One program per (batch·head, chunk), as the
    forward, recomputing what it needs (γ, the decays, q kᵀ, k kᵀ, A, T = (I + A)⁻¹ by the same blocked
    inverse, U and W block by block) in registers; with ``q̂``, ``k̂`` the (normalised) rows, ``b = β``:

        d(b v) = Tᵀ dU,   dR = Tᵀ dW  (R = b e^γ k̂),   dA = −(d(b v) Uᵀ + dR Wᵀ) on i < r  (= −Tᵀ dT Tᵀ),
        dv = b d(b v),   dβ = rowsum(v ⊙ d(b v)) + e^γ (k̂·dR) + rowsum(dA ⊙ k̂k̂ᵀ ⊙ decay),
        dQK = dattn ⊙ decay,   dKK = dA ⊙ b decay (strict),
        dq̂ = e^γ dqg + dQK k̂,   dk̂ = e^(γ_C−γ) dkd + dQKᵀ q̂ + b e^γ dR + (dKK + dKKᵀ) k̂,
        dγ = e^γ (q̂·dqg) − e^(γ_C−γ) (k̂·dkd) + b e^γ (k̂·dR) + (rows − columns of dattn ⊙ attn and dA ⊙ A),
        dγ_C = Σ e^(γ_C−γ) (k̂·dkd) + e^(γ_C) dlast,   dg_j = Σ_{r >= j} dγ_r + dγ_C,

    then ``dx = (dx̂ − x̂ (x̂·dx̂)) / max(‖x‖, 1e-12)`` with ``normalize`` (the row dots x̂·dx̂ from the [C, C]
    tiles and the row sums above: no extra pass). Without the delta term ``U = b v``: ``dv = b dU``,
    ``dβ = rowsum(v ⊙ dU)``. ``fault`` (tests only, negative controls): ``'no_dinv'`` drops dA (the
    −Tᵀ dT Tᵀ term), ``'no_revcumsum'`` writes dg = dγ + dγ_C (no reverse cumsum), ``'no_norm_proj'`` leaves the
    normalisation's projection out."""
    _check(q, k, v, g, beta, chunk, dot_precision, block_k, block_v, None)
    if fault not in BACKWARD_FAULTS:
        raise ValueError(f"wy_triton.pieces_backward: fault must be one of {list(BACKWARD_FAULTS)}, got {fault!r}")
    limit = MAX_BACKWARD_CHUNK if q.is_cuda else COMPILE_BACKWARD_CHUNK
    if chunk > limit:
        raise ValueError(f"wy_triton.pieces_backward: chunk must be <= {limit}"
                         f"{' on a GPU (see MAX_BACKWARD_CHUNK)' if q.is_cuda else ''}, got {chunk}")
    batch, heads, length, dk = k.shape
    dv = v.shape[-1]
    n = triton.cdiv(length, chunk)
    dev, f32 = k.device, torch.float32
    shapes = ((batch, heads, n, chunk, dk), (batch, heads, n, chunk, chunk), (batch, heads, n, chunk, dv),
              (batch, heads, n, chunk, dk), (batch, heads, n, chunk, dk), (batch, heads, n))
    incoming = [torch.zeros(shape, device=dev, dtype=f32) if d is None or (i == 3 and not delta)
                else d.to(f32).contiguous() for i, (d, shape) in enumerate(zip(dpieces, shapes))]
    dq = torch.empty(batch, heads, length, dk, device=dev, dtype=f32)
    dkk = torch.empty(batch, heads, length, dk, device=dev, dtype=f32)
    dvv = torch.empty(batch, heads, length, dv, device=dev, dtype=f32)
    dg = torch.empty(batch, heads, length, device=dev, dtype=f32) if g is not None else None
    dbeta = torch.empty(batch, heads, length, device=dev, dtype=f32) if beta is not None else None
    programs = batch * heads * n
    if programs:
        gs = g.stride() if g is not None else (0, 0, 0)
        bs = beta.stride() if beta is not None else (0, 0, 0)
        jit_kernel(_wy_bwd_src)[(programs,)](
            q, k, v, k if g is None else g, k if beta is None else beta, *incoming,
            dq, dkk, dvv, dq if dg is None else dg, dq if dbeta is None else dbeta,
            length, n, heads, *q.stride(), *k.stride(), *v.stride(), *gs, *bs,
            C=chunk, DK=dk, DV=dv, BC=_block(chunk), BK=min(block_k, _block(dk)), BV=min(block_v, _block(dv)),
            HAS_G=int(g is not None), HAS_BETA=int(beta is not None), DELTA=int(delta),
            NORMALIZE=int(normalize), PRECISION=dot_precision, FAULT=BACKWARD_FAULTS[fault], NB=_block(chunk) // 16,
            num_warps=num_warps or warps(chunk))
    return (dq.to(q.dtype), dkk.to(k.dtype), dvv.to(v.dtype), None if g is None else dg.to(g.dtype),
            None if beta is None else dbeta.to(beta.dtype))


class _WYPieces(torch.autograd.Function):
    """:func:`pieces_forward` (saves the inputs only) with, by ``opts['backward']``, the backward of
    :func:`reference_pieces` (``torch``: recomputed under enable_grad and backpropagated) or the backward
    kernel (``triton``: :func:`pieces_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, opts):
        forward_opts = {key: val for key, val in opts.items() if key not in ("backward", "backward_fault")}
        pieces = pieces_forward(q, k, v, g, beta, **forward_opts)
        ctx.save_for_backward(q, k, v, g, beta)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return pieces

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *dpieces):
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        opts = ctx.opts
        if opts.get("backward", "torch") == "triton":
            if not any(need and t is not None for t, need in zip(inputs, needs)):
                return None, None, None, None, None, None
            grads = pieces_backward(*inputs, dpieces, delta=opts["delta"], chunk=opts["chunk"],
                                    normalize=opts["normalize"], dot_precision=opts["dot_precision"],
                                    block_k=opts["block_k"], block_v=opts["block_v"], num_warps=opts["num_warps"],
                                    fault=opts.get("backward_fault"))
            return (*(d if need else None for d, need in zip(grads, needs)), None)
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
        wanted = [t for t, need in zip(leaves, needs) if t is not None and need]
        grads = {}
        if wanted:
            with torch.enable_grad():
                pieces = reference_pieces(*leaves, delta=opts["delta"], chunk=opts["chunk"],
                                          normalize=opts["normalize"])
            pairs = [(p, d) for p, d in zip(pieces, dpieces)  # last has no graph without a gate that needs one
                     if p is not None and d is not None and p.requires_grad]
            if pairs:
                got = torch.autograd.grad([p for p, _ in pairs], wanted, [d for _, d in pairs], allow_unused=True)
                grads = {id(t): d for t, d in zip(wanted, got)}
        return (*(None if t is None else grads.get(id(t)) for t in leaves), None)


def wy_pieces(q, k, v, g=None, beta=None, *, delta: bool, chunk: int, normalize: bool = False,
              dot_precision=DEFAULTS["dot_precision"], block_k=DEFAULTS["block_k"], block_v=DEFAULTS["block_v"],
              num_warps=None, fault=None, backward="torch", backward_fault=None):
    """``(qg, attn, U, W, kd, last)`` of :func:`gated_delta.chunk_pieces` by the fused kernel, differentiable
    in q, k, v, g and beta (:class:`_WYPieces`; ``backward``: ``torch``, the default, recomputes through
    PyTorch; ``triton``: the backward kernel, :func:`pieces_backward`, with ``backward_fault`` its negative
    controls). Inputs [B, H, L, d]
    (fp32, bf16 or fp16, any strides; L need not be a multiple of ``chunk``); ``normalize``: q and k
    ℓ2-normalised here (else they are used as given). CUDA or ``TRITON_INTERPRET=1``."""
    opts = dict(delta=bool(delta), chunk=int(chunk), normalize=bool(normalize), dot_precision=dot_precision,
                block_k=block_k, block_v=block_v, num_warps=num_warps, fault=fault, backward=backward,
                backward_fault=backward_fault)
    if backward not in BACKWARDS:
        raise ValueError(f"wy_triton.wy_pieces: backward must be one of {BACKWARDS}, got {backward!r}")
    if backward_fault not in BACKWARD_FAULTS:
        raise ValueError(f"wy_triton.wy_pieces: backward_fault must be one of {list(BACKWARD_FAULTS)}, "
                         f"got {backward_fault!r}")
    if backward == "triton" and chunk > MAX_BACKWARD_CHUNK:
        raise ValueError(f"wy_triton.wy_pieces: chunk must be <= {MAX_BACKWARD_CHUNK} with backward 'triton', "
                         f"got {chunk}")
    return _WYPieces.apply(q, k, v, g, beta, opts)
