"""Triton kernels of causal linear attention (elu+1 features, normalised): the fast path of
``linear_attn_triton`` (methods/linear/linear_attn.py). Imported lazily by the builder: importing this module
imports triton.

One generic kernel, :func:`_chunk_scan_src`, computes the chunked causal (or anti-causal) scan

    o_i = Σ_{j <= i} (a_i · b_j + ea_i + eb_j) c_j            (REVERSE: Σ_{j >= i})

with ``a, b`` ``[B, H, T, DK]``, ``c`` ``[B, H, T, DV]`` and optional per-row fp32 scalars ``ea`` (a side)
or ``eb`` (b side), in two kernels (fla's chunked structure):

- the state kernel :func:`_chunk_states_src`, grid ``(cdiv(DK, 64), cdiv(DV, BV), B · Hb)``, walks the chunks
  in order (REVERSE: backwards) doing only the state update ``S += φ(b)ᵀ c`` (fp32; ``z += Σ φ(b)`` with
  NORM; ``u += Σ c`` or ``u += Σ eb · c`` with ``ea`` / ``eb``) and stores what is carried into every
  *segment* of ``seg_chunks`` chunks (fp32 ``[B·Hb, NSEG, DK, DV]``: ``T / (chunk · seg_chunks) · DK · DV ·
  4`` bytes per head: 256 MiB per head at 1M tokens, d = 128, chunk 64, seg_chunks 4; one state per chunk
  would be 1 GiB per head, hence segments);
- the scan kernel :func:`_chunk_scan_src`, grid ``(cdiv(DV, BV), B · H, NSEG)``: each program loads its
  segment's state and walks the segment's chunks (outputs of the intra-chunk part ``tl.dot(a, bᵀ) (+ ea_i +
  eb_j)`` masked to ``j <= i`` plus ``a · S`` (``+ ea_i u`` or ``+ u``), and the state update in registers).
  One segment (short inputs): no state kernel. A scan may instead be handed the states of another scan
  (``Carried``, read transposed where b and c are swapped): the backward uses that twice.

Operands of every ``tl.dot`` are in the input dtype (bf16/fp16 on the tensor cores; fp32 inputs with
``input_precision="ieee"``, no tf32), accumulation in fp32.

- ``FEATURE=1`` applies ``φ(x) = elu(x) + 1`` to ``a`` and ``b`` as they are loaded (``feature_map="fused"``:
  no feature tensors in memory); the default ``feature_map="precomputed"`` writes φ(q), φ(k) once with an
  elementwise pass (:func:`_rows_src`, the same rounding) and the scans load them like any operand;
- ``NORM=1`` also carries ``z = Σ b_j`` (fp32) and divides by ``den_i = a_i · z_i + Σ_{j<=i in chunk} a_i ·
  b_j + eps``, the denominator of ``linear_attn`` (methods/linear/common.py), stored (fp32) for the backward;
- ``DIVR=1`` divides output row ``i`` by ``r_i`` (fp32), ``GRADX=1`` multiplies the output by ``φ'(x)`` of a
  raw input ``x`` (the chain rule of elu+1, fp32), both before the store;
- head dims that are not a power of two (or below 16, ``tl.dot``'s minimum) are padded in registers with
  masked loads (feature columns beyond the head dim are forced to 0: ``φ(0) = 1`` would otherwise count);
- lengths that are not a multiple of the chunk: the tail chunk is masked (rows beyond ``T`` load as 0 and
  their features are forced to 0), nothing is padded in memory.

Backward (Triton, three scans and one state pass): with ``D_i`` the stored denominator, ``p = −(dO · out)``,
``dN = dO / D``, ``dD = p / D`` (one row-wise pass, :func:`_rows_src`: dN in the input dtype, p fp32 ``[B, H,
T]``),

    dq_i = φ'(q_i) / D_i Σ_{j<=i} (dO_i · v_j + p_i) φk_j  (scan a=dO, b=v, c=φk, ea=p, DIVR by D, GRADX x=q)
    dk_j = φ'(k_j) Σ_{i>=j} (v_j · dN_i + dD_i) φq_i       (reverse scan a=v, b=dN, c=φq, eb=dD, GRADX x=k)
    dv_j =         Σ_{i>=j} (φk_j · φq_i) dN_i             (reverse scan a=φk, b=φq, c=dN)

(dq takes dO itself and divides its fp32 output rows by D: one bf16 rounding fewer than dN; on the CPU, the
interpreter rounding to nearest like the GPU, dq rel_err 0.0057-0.0077 over five small cases where the former
backward had 0.0072-0.0087; dq is the largest gradient error, and rounding φ(q), φ(k) to bf16 alone costs
it ~0.0037),

- the dq scan's states ``Σ v_jᵀ φk_j`` and sums ``Σ φk_j`` are the forward's ``Σ φk_jᵀ v_j`` (transposed) and
  ``z``: the forward keeps them (fp32, the size given above) and the dq scan runs no state kernel;
- the dv scan's states ``Σ φq_iᵀ dN_i`` are the dk scan's ``Σ dN_iᵀ φq_i`` transposed: one state pass serves
  both reverse scans;
- GQA: the forward and dq scans read k, v (and φk) on the kv heads (head ``h // group``); the dk and dv scans
  read v, φk there too and write per query head (fp32), summed over each group.

What changed (this version) and why it should be faster. The former backward ran the three scans with
``FEATURE=0, NORM=0`` on operands already in the input dtype (so its dots were on the tensor cores: the
fp32/ieee explanation does not hold), but added the ``dD`` terms in PyTorch as ``dD ⊙ cumsum(φk)`` and a
reverse ``cumsum(dD ⊙ φq)`` along the sequence of fp32 ``[B, H, T, d]`` tensors. PyTorch's CUDA cumsum along
a non-innermost dimension (``tensor_kernel_scan_outer_dim``) gives each of the ``B·H·d`` columns (2048 at 16
heads, d 128) to one thread that walks all T rows serially with a dependent load/store per row: latency
bound. The H200 rows fit that and nothing else: the backward (fwd_bwd − fwd) minus simple_gla_triton's
backward (the cost of three scans of the same structure), halved, is 3.2 / 13.4 / 54 / 428 ms at 8K / 32K /
128K / 1M, i.e. 0.39-0.41 µs per row at every length, while a bandwidth-bound fp32 cumsum at 32K (512 MB
moved) would take ~0.1 ms.
Around them sat a dozen full-size fp32 passes (dO and out widened, dN, the chain rule φ'(x) with its own fp32
temporary, fp32 scan outputs read back and narrowed; ~3 GB at 32K, ~0.7 ms) and a third state pass.
Now: (1) the ``dD`` terms are folded into the scans (``ea``/``eb`` added to the chunk's scores in fp32, and
``Σ c`` / ``Σ eb·c`` carried like ``z``): no cumsum, no fp32 ``[B, H, T, d]`` temporary at all (dN/dD in one
pass; dq, dk, dv written in the input dtype when there is no GQA); (2) φ' is applied in the scan's epilogue;
(3) one state pass instead of three (the dq scan reuses the forward's states, the dv scan the dk scan's);
(4) the forward writes φ(q), φ(k) once (bf16, kept for the backward, which needs them anyway) instead of
evaluating elu+1 (an ``exp`` per element) in every program that loads them: 2 x per q element and 4 x per k
element, ~16K exponentials per chunk step of the scan next to its ~1.3M MACs, and in the sequential state
kernel. The backward then costs about three scans plus one state pass, as simple_gla_triton's does (its 32K
backward is 4.5 ms with four state passes), so fwd_bwd at 32K should drop from 34.6 ms to roughly 6-12 ms
(PyTorch linear_attn: 13.8 ms) and scale linearly (1M: roughly 200-400 ms instead of 1,099 ms). These are
estimates from the structure, not measurements; the spread is the register spills below.

Register spills and shared memory (scripts/triton_spills.py: the launches a forward + backward really makes,
recorded and compiled for sm_90a on the CPU with the JIT's own specialisation, ptxas -v; head dim 128, chunk 64,
block_v 64, bf16), spill stores / loads per thread at 4 / 8 warps: forward scan 52/48 / 0, dq scan 44/44 / 0,
dk scan 52/52 / 0, dv scan 0 / 0, state kernels 0 / 0 (the fused-φ forward 884/976 / 204/144; simple_gla_triton's
scans 164-392 B at 4 warps). An earlier version of that script compiled the kernels from a hand-written
signature without the JIT's alignment specialisation and reported spills 20-60 x larger (1952 B for the
forward): it was wrong, and so was the inference that the spills made this forward slow. The H200 agrees with
the small figures: 8 warps are slower, not faster (results/h200-linear-triton-v3-w8 against
results/h200-linear-triton-v3: fwd 1.45 vs 1.03 ms at 32K, 5.66 vs 4.01 at 128K; fwd_bwd 4.16 vs 3.46 ms
at 32K, 16.4 vs 13.6 at 128K), so the default stays 4. Shared memory: up to 136 KB at 128-wide tiles; at
256-wide tiles (cosFormer's 2d = 256 features, head dim 256) three pipeline stages need up to 248 KB, over the
SM's 227 KB (the H200's ``OutOfResources`` in results/h200-linear-kernelized-triton), so those scans run two
stages (``WIDE_SCAN_STAGES``, 180 KB; tests/test_triton_fit.py checks every launch offline).

Numerics: the ``dD`` terms now meet the scores in fp32 before the one rounding to the input dtype (before: the
bf16-rounded ``dN·v`` scores, then an fp32 ``dD · Σ φk`` added to the output), and dq no longer rounds dN.

Measured on the H200 (results/h200-linear-triton-v3, 16 heads, hd 128, bf16, causal): fwd_bwd 1.28 / 3.46 /
13.6 / 109 ms at 8K / 32K / 128K / 1M (the version before: 8.81 / 34.6 / 138 / 1,099), fwd 0.274 / 1.03 /
4.01 / 32.0 ms.

Not done (next steps): dk and dv could share one kernel (both walk the same reverse segments and load φq, dN); ``seg_chunks`` could
adapt to the length (fewer, longer segments at 1M where parallelism is ample).

Identity features (``feature_map="identity"``): the scans take any given features ``[B, H, T, m]`` (m up to
``MAX_WIDTH`` = 256, not necessarily v's width: the kernels pad both widths to powers of two in registers, with
masked loads) and the backward skips the chain rule of elu+1: the kernelised methods' ``impl: triton``
(performer, cosFormer, linear_attn; methods/linear/common.py) computes its feature maps in PyTorch and runs
the causal normalised scan here. ``floor`` (rfa): the denominator ``max(Σ, floor) + eps`` (``FLOOR=1``; the
forward also writes a per-row fp32 flag ``Σ >= floor``, and the backward multiplies ``p`` by it: the sum gets
no gradient on floored rows, as autograd of ``clamp_min`` in methods/linear/common.py's ``_den``).

Kernels are decorated on first use, once per interpreter mode: ``triton.jit`` reads ``TRITON_INTERPRET`` when
it decorates, so the CPU tests (which set it) and a GPU process get the right flavour whatever was imported
first.
"""

import typing

import triton
import triton.language as tl
import torch


def _chunk_scan_src(A, B, C, O, DEN, S0, Z0, E, U0, X, T, NSEG, H, GA, GB, GX,
                    sab, sah, sat, sad, sbb, sbh, sbt, sbd, scb, sch, sct, scd, sob, soh, sot, sod,
                    sxb, sxh, sxt, sxd, eps, ACT, floor,
                    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
                    SEG: tl.constexpr, HAS_S0: tl.constexpr, HAS_U: tl.constexpr, TRANS_S: tl.constexpr,
                    FEATURE: tl.constexpr, NORM: tl.constexpr, EXTRA: tl.constexpr, DIVR: tl.constexpr,
                    GRADX: tl.constexpr, REVERSE: tl.constexpr, MASK_INTRA: tl.constexpr, PRECISION: tl.constexpr,
                    DOT_T: tl.constexpr, FLOOR: tl.constexpr = 0):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    ha = h // GA  # a's head (GQA: the keys' head in the dk / dv scans)
    hb = h // GB  # b's and c's head (GQA: the keys' head in the forward and dq scans)
    HB = H // GB
    a_base = A + b.to(tl.int64) * sab + ha.to(tl.int64) * sah
    b_base = B + b.to(tl.int64) * sbb + hb.to(tl.int64) * sbh
    c_base = C + b.to(tl.int64) * scb + hb.to(tl.int64) * sch
    o_base = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    x_base = X + b.to(tl.int64) * sxb + (h // GX).to(tl.int64) * sxh
    if EXTRA == 1:  # ea [B, H, T] fp32, per output row
        e_base = E + (b.to(tl.int64) * H + h) * T
    else:  # eb [B, HB, T] fp32, per b row
        e_base = E + (b.to(tl.int64) * HB + hb) * T
    rows = tl.arange(0, CH)
    dk = tl.arange(0, BK)
    dv = pid_v * BV + tl.arange(0, BV)
    kmask = dk < DK
    vmask = dv < DV
    if REVERSE:
        visible = rows[:, None] <= rows[None, :]
    else:
        visible = rows[:, None] >= rows[None, :]
    if not MASK_INTRA:  # negative control for the tests only: the intra-chunk causal mask switched off
        visible = rows[:, None] >= 0
    kv_seg = (b.to(tl.int64) * HB + hb) * NSEG + seg
    if HAS_S0:  # the state carried into this segment, from the state kernel (or the forward), per b head
        if TRANS_S:  # stored as the [DV, DK] state of the transposed scan (b and c swapped)
            s_off = dv[None, :] * DK + dk[:, None]
        else:
            s_off = dk[:, None] * DV + dv[None, :]
        state = tl.load(S0 + kv_seg * (DK * DV) + s_off, mask=kmask[:, None] & vmask[None, :], other=0.0)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0 and NORM:
        zsum = tl.load(Z0 + kv_seg * DK + dk, mask=kmask, other=0.0)
    else:
        zsum = tl.zeros([BK], dtype=tl.float32)
    if HAS_U:  # Σ c (EXTRA=1) or Σ eb·c (EXTRA=2) over the chunks before this segment
        usum = tl.load(U0 + kv_seg * DV + dv, mask=vmask, other=0.0)
    else:
        usum = tl.zeros([BV], dtype=tl.float32)
    for it in range(0, SEG):
        if REVERSE:
            chunk = seg * SEG + (SEG - 1 - it)
        else:
            chunk = seg * SEG + it
        t = (chunk * CH + rows).to(tl.int64)
        tmask = t < T
        ak_mask = tmask[:, None] & kmask[None, :]
        cv_mask = tmask[:, None] & vmask[None, :]
        a = tl.load(a_base + t[:, None] * sat + dk[None, :] * sad, mask=ak_mask, other=0.0)
        bb = tl.load(b_base + t[:, None] * sbt + dk[None, :] * sbd, mask=ak_mask, other=0.0)
        c = tl.load(c_base + t[:, None] * sct + dv[None, :] * scd, mask=cv_mask, other=0.0)
        if FEATURE == 1:  # elu(x) + 1 = x + 1 (x > 0), exp(x) (x <= 0); padding rows/columns -> 0
            af = a.to(tl.float32)
            bf = bb.to(tl.float32)
            a = tl.where(ak_mask, tl.where(af > 0, af + 1.0, tl.exp(af)), 0.0).to(A.dtype.element_ty)
            bb = tl.where(ak_mask, tl.where(bf > 0, bf + 1.0, tl.exp(bf)), 0.0).to(B.dtype.element_ty)
        a = a.to(DOT_T)
        bb = bb.to(DOT_T)
        c = c.to(DOT_T)
        scores = tl.dot(a, tl.trans(bb), input_precision=PRECISION)
        if EXTRA == 1:  # (a_i · b_j + ea_i): added in fp32 before the product is rounded for the next dot
            ea = tl.load(e_base + t, mask=tmask, other=0.0)
            scores += ea[:, None]
        if EXTRA == 2:  # (a_i · b_j + eb_j)
            eb = tl.load(e_base + t, mask=tmask, other=0.0)
            scores += eb[None, :]
        scores = tl.where(visible, scores, 0.0)
        out = tl.dot(a, state.to(A.dtype.element_ty).to(DOT_T), input_precision=PRECISION)
        out += tl.dot(scores.to(C.dtype.element_ty).to(DOT_T), c, input_precision=PRECISION)
        if EXTRA == 1:
            out += ea[:, None] * usum[None, :]
            usum += tl.sum(c.to(tl.float32), axis=0)
        if EXTRA == 2:
            out += usum[None, :]
            usum += tl.sum(eb[:, None] * c.to(tl.float32), axis=0)
        if NORM:
            den = tl.sum(a.to(tl.float32) * zsum[None, :], axis=1) + tl.sum(scores, axis=1)
            if FLOOR:  # max(den, floor) + eps (rfa's normaliser); ACT: 1 where den >= floor (the gradient passes)
                if pid_v == 0:
                    tl.store(ACT + pid_bh.to(tl.int64) * T + t, (den >= floor).to(tl.float32), mask=tmask)
                den = tl.maximum(den, floor)
            den = den + eps
            out = out / den[:, None]
            if pid_v == 0:
                tl.store(DEN + pid_bh.to(tl.int64) * T + t, den, mask=tmask)
            zsum += tl.sum(bb.to(tl.float32), axis=0)
        state += tl.dot(tl.trans(bb), c, input_precision=PRECISION)
        if DIVR:  # out_i / r_i, r [B, H, T] fp32 (read through DEN)
            out = out / tl.load(DEN + pid_bh.to(tl.int64) * T + t, mask=tmask, other=1.0)[:, None]
        if GRADX:  # the chain rule of elu+1 on the output: x [.., T, DV] the raw input, φ'(x) = 1 or exp(x)
            x = tl.load(x_base + t[:, None] * sxt + dv[None, :] * sxd, mask=cv_mask, other=0.0).to(tl.float32)
            out = out * tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
        tl.store(o_base + t[:, None] * sot + dv[None, :] * sod, out.to(O.dtype.element_ty), mask=cv_mask)


def _chunk_states_src(B, C, S0, Z0, E, U0, T, NSEG, H,
                      sbb, sbh, sbt, sbd, scb, sch, sct, scd,
                      DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
                      SEG: tl.constexpr, FEATURE: tl.constexpr, NORM: tl.constexpr, EXTRA: tl.constexpr,
                      REVERSE: tl.constexpr, PRECISION: tl.constexpr, NSEG_INTERP: tl.constexpr,
                      DOT_T: tl.constexpr):
    """The states carried into every segment (of SEG chunks): grid (DK blocks, DV blocks, B · Hb), each
    program walks the chunks in order (REVERSE: backwards) doing only the state update ``S += φ(b)ᵀ c`` (and
    ``z += Σ φ(b)`` with NORM, ``u += Σ c`` with EXTRA=1, ``u += Σ eb · c`` with EXTRA=2) and stores the
    state at each segment start (fp32)."""
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    b_base = B + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    c_base = C + b.to(tl.int64) * scb + h.to(tl.int64) * sch
    e_base = E + pid_bh.to(tl.int64) * T
    rows = tl.arange(0, CH)
    dk = pid_k * BK + tl.arange(0, BK)
    dv = pid_v * BV + tl.arange(0, BV)
    kmask = dk < DK
    vmask = dv < DV
    s_base = S0 + pid_bh.to(tl.int64) * NSEG * (DK * DV) + dk[:, None] * DV + dv[None, :]
    s_mask = kmask[:, None] & vmask[None, :]
    z_base = Z0 + pid_bh.to(tl.int64) * NSEG * DK + dk
    z_mask = kmask & (pid_v == 0)
    u_base = U0 + pid_bh.to(tl.int64) * NSEG * DV + dv
    u_mask = vmask & (pid_k == 0)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    zsum = tl.zeros([BK], dtype=tl.float32)
    usum = tl.zeros([BV], dtype=tl.float32)
    # every segment but the last (REVERSE: the first) hands its state on; NSEG_INTERP > 0 in the interpreter
    # only (a constexpr loop bound, see chunk_scan)
    for i in range(0, NSEG_INTERP - 1 if NSEG_INTERP > 0 else NSEG - 1):
        if REVERSE:
            seg = NSEG - 1 - i
        else:
            seg = i
        tl.store(s_base + tl.cast(seg, tl.int64) * (DK * DV), state, mask=s_mask)
        if NORM:
            tl.store(z_base + tl.cast(seg, tl.int64) * DK, zsum, mask=z_mask)
        if EXTRA != 0:
            tl.store(u_base + tl.cast(seg, tl.int64) * DV, usum, mask=u_mask)
        for it in range(0, SEG):
            if REVERSE:
                chunk = seg * SEG + (SEG - 1 - it)
            else:
                chunk = seg * SEG + it
            t = (chunk * CH + rows).to(tl.int64)
            tmask = t < T
            bk_mask = tmask[:, None] & kmask[None, :]
            bb = tl.load(b_base + t[:, None] * sbt + dk[None, :] * sbd, mask=bk_mask, other=0.0)
            c = tl.load(c_base + t[:, None] * sct + dv[None, :] * scd, mask=tmask[:, None] & vmask[None, :],
                        other=0.0)
            if FEATURE == 1:
                bf = bb.to(tl.float32)
                bb = tl.where(bk_mask, tl.where(bf > 0, bf + 1.0, tl.exp(bf)), 0.0).to(B.dtype.element_ty)
            bb = bb.to(DOT_T)
            c = c.to(DOT_T)
            if NORM:
                zsum += tl.sum(bb.to(tl.float32), axis=0)
            if EXTRA == 1:
                usum += tl.sum(c.to(tl.float32), axis=0)
            if EXTRA == 2:
                eb = tl.load(e_base + t, mask=tmask, other=0.0)
                usum += tl.sum(eb[:, None] * c.to(tl.float32), axis=0)
            state += tl.dot(tl.trans(bb), c, input_precision=PRECISION)
    if REVERSE:
        last = 0
    else:
        last = NSEG - 1
    tl.store(s_base + tl.cast(last, tl.int64) * (DK * DV), state, mask=s_mask)
    if NORM:
        tl.store(z_base + tl.cast(last, tl.int64) * DK, zsum, mask=z_mask)
    if EXTRA != 0:
        tl.store(u_base + tl.cast(last, tl.int64) * DV, usum, mask=u_mask)


def _rows_src(X, Y, O, DEN, R, T, H, sxb, sxh, sxt, sxd, syb, syh, syt, syd,
              D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, OP: tl.constexpr):
    """Row-wise elementwise passes over ``[B, H, T, D]`` (any strides; writes contiguous), grid
    ``(cdiv(T, BT), B · H)``. OP=0: ``O = elu(X) + 1`` in O's dtype (each branch in fp32, rounded once: the
    same values as the kernels' fused feature map). OP=1, the backward's prologue, with X = dO, Y = the
    forward output, DEN = its stored denominator: ``O = dN = dO / D`` (O's dtype) and ``R = −(dO · out)``
    (fp32 ``[B, H, T]``; ``dD = R / D``)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    t = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    d = tl.arange(0, BD)
    tmask = t < T
    m = tmask[:, None] & (d[None, :] < D)
    x = tl.load(X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + t[:, None] * sxt + d[None, :] * sxd,
                mask=m, other=0.0).to(tl.float32)
    o_ptr = O + pid_bh.to(tl.int64) * T * D + t[:, None] * D + d[None, :]
    if OP == 0:
        tl.store(o_ptr, tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0))).to(O.dtype.element_ty), mask=m)
    else:
        y = tl.load(Y + b.to(tl.int64) * syb + h.to(tl.int64) * syh + t[:, None] * syt + d[None, :] * syd,
                    mask=m, other=0.0).to(tl.float32)
        den = tl.load(DEN + pid_bh.to(tl.int64) * T + t, mask=tmask, other=1.0)
        tl.store(R + pid_bh.to(tl.int64) * T + t, -tl.sum(x * y, axis=1), mask=tmask)
        tl.store(o_ptr, (x / den[:, None]).to(O.dtype.element_ty), mask=m)


_KERNELS: dict[tuple[object, bool], object] = {}
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_SRC = {"scan": _chunk_scan_src, "states": _chunk_states_src, "rows": _rows_src}


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return bool(triton.knobs.runtime.interpret)


def jit_kernel(src):
    """``triton.jit(src)``, decorated once per interpreter mode (``triton.jit`` reads ``TRITON_INTERPRET`` when
    it decorates); shared by the own kernel modules (gla_triton.py, delta_triton.py)."""
    key = (src, interpreting())
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit(src)
    return _KERNELS[key]


def _kernel(name: str = "scan"):
    return jit_kernel(_SRC[name])


SCAN_STAGES, WIDE_SCAN_STAGES = 3, 2  # the scan's pipeline stages up to 128-wide a / b tiles, and above


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class Carried(typing.NamedTuple):
    """What a scan carries into each of its segments (fp32, per b head, segment by segment; None where not
    computed): the states ``[B·Hb, NSEG, DK, DV]`` (``transposed``: the ``[.., DV, DK]`` states of the scan
    with b and c swapped, read transposed), the key sums ``zsums`` ``[B·Hb, NSEG, DK]`` (``normalize``) and
    the sums ``usums`` ``[B·Hb, NSEG, DV]`` of ``c`` (``add_a``) or of ``eb · c`` (``add_b``)."""
    states: torch.Tensor | None = None
    zsums: torch.Tensor | None = None
    usums: torch.Tensor | None = None
    transposed: bool = False


def _rows(op: int, x, y=None, den=None, *, out_dtype, block_t: int = 32):
    batch, heads, seq, dim = x.shape
    out = torch.empty(batch, heads, seq, dim, device=x.device, dtype=out_dtype)
    red = torch.empty(batch, heads, seq, device=x.device, dtype=torch.float32) if op == 1 else out
    if seq == 0:
        return (out, red) if op == 1 else out
    y = x if y is None else y
    grid = (triton.cdiv(seq, block_t), batch * heads)
    _kernel("rows")[grid](x, y, out, out if den is None else den, red, seq, heads, *x.stride(), *y.stride(),
                          D=dim, BD=_block(dim), BT=block_t, OP=op)
    return (out, red) if op == 1 else out


def elu1(x):
    """``elu(x) + 1`` in ``x``'s dtype (a Triton elementwise pass, contiguous output)."""
    return _rows(0, x, out_dtype=x.dtype)


def chunk_scan(a, b, c, *, chunk: int, block_v: int, eps: float = 0.0, feature: bool = False,
               normalize: bool = False, reverse: bool = False, num_warps: int = 4, mask_intra: bool = True,
               seg_chunks: int = 4, out_dtype=None, carry: bool = True, add_a=None, add_b=None, grad_x=None,
               divide_rows=None, carried: Carried | None = None, carry_sums: bool = True,
               return_states: bool = False, floor: float | None = None, active=None):
    """``o_i = Σ_{j<=i} (φ(a_i)·φ(b_j) + ea_i + eb_j) c_j`` (``reverse``: ``j >= i``), optionally divided by
    ``φ(a_i) · Σ_{j<=i} φ(b_j) + eps`` (``normalize``; then also returns that denominator, fp32 ``[B, H, T]``).
    ``floor`` (with ``normalize``): the sum is clamped at ``floor`` before ``eps`` is added (``max(Σ, floor) +
    eps``, rfa's normaliser, methods/linear/common.py ``_den``) and ``active`` (fp32 ``[B, H, T]``, given by the
    caller) receives 1 where ``Σ >= floor`` (the sum's gradient passes, as autograd of ``clamp_min``) else 0.

    ``a`` ``[B, Ha, T, DK]``, ``b`` ``[B, Hb, T, DK]``, ``c`` ``[B, Hb, T, DV]`` (any strides, one dtype); the
    output has ``H = max(Ha, Hb)`` heads (head ``h`` reads a's head ``h // (H / Ha)`` and b's ``h // (H /
    Hb)``: GQA either way) and ``out_dtype`` (default ``c``'s). ``φ`` is elu+1 when ``feature`` else the
    identity. ``add_a`` (``ea``, fp32 ``[B, H, T]``) or ``add_b`` (``eb``, fp32 ``[B, Hb, T]``), at most one:
    per-row scalars added to every score in fp32 (the backward's ``dD`` terms; the scan then also carries ``Σ
    c`` or ``Σ eb · c`` across chunks). ``grad_x`` (``[B, Hx, T, DV]``, Hx dividing H): the output is
    multiplied by ``φ'(grad_x)`` (elu+1's derivative) before it is stored.

    Segments of ``seg_chunks`` chunks run in parallel from the states carried into them: ``carried`` (e.g. the
    forward's, for the dq scan) or else computed by the state kernel. ``return_states`` also returns the
    :class:`Carried` used. ``carry=False`` starts every segment from zero and ``carry_sums=False`` drops the
    carried sums of ``add_a`` / ``add_b`` (their terms from earlier segments): deliberately broken variants for
    the tests."""
    batch, heads_a, seq, dk = a.shape
    heads_b = b.shape[1]
    dvv = c.shape[-1]
    heads = max(heads_a, heads_b)
    if not (a.dtype == b.dtype == c.dtype):
        raise TypeError(f"chunk_scan: a, b, c must share one dtype, got {a.dtype}, {b.dtype}, {c.dtype}")
    if b.shape[:3] != c.shape[:3] or b.shape[-1] != dk or heads % heads_a or heads % heads_b \
            or b.shape[0] != batch or b.shape[2] != seq:
        raise ValueError(f"chunk_scan: shapes do not fit: a {tuple(a.shape)}, b {tuple(b.shape)}, c {tuple(c.shape)}")
    if add_a is not None and add_b is not None:
        raise ValueError("chunk_scan: add_a and add_b cannot both be given")
    if normalize and (add_a is not None or add_b is not None or divide_rows is not None):
        raise ValueError("chunk_scan: normalize does not combine with add_a / add_b / divide_rows")
    if (floor is not None) != (active is not None) or (floor is not None and not normalize):
        raise ValueError("chunk_scan: floor needs normalize and an active [B, H, T] fp32 output, and vice versa")
    if active is not None and (tuple(active.shape) != (batch, heads, seq) or active.dtype != torch.float32
                               or not active.is_contiguous()):
        raise ValueError(f"chunk_scan: active must be contiguous fp32 {(batch, heads, seq)}, got {active.dtype} "
                         f"{tuple(active.shape)}")
    extra, e = (1, add_a) if add_a is not None else (2, add_b) if add_b is not None else (0, None)
    if e is not None:
        want = (batch, heads if extra == 1 else heads_b, seq)
        if tuple(e.shape) != want or e.dtype != torch.float32:
            raise ValueError(f"chunk_scan: add_{'ab'[extra - 1]} must be fp32 {want}, got {e.dtype} {tuple(e.shape)}")
        e = e.contiguous()
    if grad_x is not None and (grad_x.shape[0] != batch or heads % grad_x.shape[1]
                               or tuple(grad_x.shape[2:]) != (seq, dvv)):
        raise ValueError(f"chunk_scan: grad_x {tuple(grad_x.shape)} does not fit the output "
                         f"{(batch, heads, seq, dvv)}")
    if divide_rows is not None and (tuple(divide_rows.shape) != (batch, heads, seq)
                                    or divide_rows.dtype != torch.float32):
        raise ValueError(f"chunk_scan: divide_rows must be fp32 {(batch, heads, seq)}, got {divide_rows.dtype} "
                         f"{tuple(divide_rows.shape)}")
    out = torch.empty(batch, heads, seq, dvv, device=a.device, dtype=out_dtype or c.dtype)
    den = torch.empty(batch, heads, seq, device=a.device, dtype=torch.float32) if normalize \
        else out if divide_rows is None else divide_rows.contiguous()
    n_chunks = triton.cdiv(seq, chunk)
    nseg = triton.cdiv(n_chunks, seg_chunks)
    if seq == 0:
        return _result(out, den if normalize else None, Carried() if return_states else None)
    bv = min(block_v, _block(dvv))
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    # The interpreter's tl.dot is wrong on bf16/fp16 operands (numpy has no bf16): there the operands, already
    # rounded to the input dtype, are widened to fp32 before each dot (the same products a tensor core forms)
    dot_t = tl.float32 if interpreting() else _TL_DTYPES[a.dtype]
    if carried is None:
        carried = Carried()
        if nseg > 1 and carry:
            states = torch.empty(batch * heads_b, nseg, dk, dvv, device=a.device, dtype=torch.float32)
            zsums = torch.empty(batch * heads_b, nseg, dk, device=a.device, dtype=torch.float32) \
                if normalize else None
            usums = torch.empty(batch * heads_b, nseg, dvv, device=a.device, dtype=torch.float32) \
                if extra else None
            bks = min(64, _block(dk))
            grid_s = (triton.cdiv(dk, bks), triton.cdiv(dvv, bv), batch * heads_b)
            # Triton 3.6's interpreter cannot take a runtime scalar as a loop bound under numpy >= 2.3 (it calls
            # int() on a 1-element array): there the segment count is passed as a constexpr; compiled kernels
            # loop over the runtime ``NSEG`` (no recompilation per length).
            _kernel("states")[grid_s](b, c, states, states if zsums is None else zsums,
                                      states if e is None else e, states if usums is None else usums,
                                      seq, nseg, heads_b, *b.stride(), *c.stride(),
                                      DK=dk, DV=dvv, BK=bks, BV=bv, CH=chunk, SEG=seg_chunks,
                                      FEATURE=int(feature), NORM=int(normalize), EXTRA=extra,
                                      REVERSE=int(reverse), PRECISION=precision,
                                      NSEG_INTERP=nseg if interpreting() else 0, DOT_T=dot_t,
                                      num_warps=num_warps)
            carried = Carried(states, zsums, usums)
    elif carried.states is not None:
        shape = (batch * heads_b, nseg) + ((dvv, dk) if carried.transposed else (dk, dvv))
        if tuple(carried.states.shape) != shape:
            raise ValueError(f"chunk_scan: carried states {tuple(carried.states.shape)}, expected {shape}")
    has_s0 = carried.states is not None
    if has_s0 and normalize and carried.zsums is None:
        raise ValueError("chunk_scan: normalize with carried states needs their zsums")
    has_u = has_s0 and extra != 0 and carry_sums
    if has_u and carried.usums is None:
        raise ValueError("chunk_scan: add_a / add_b with carried states needs their usums")
    anything = out
    grid = (triton.cdiv(dvv, bv), batch * heads, nseg)
    # the software pipeline's depth: 3 stages of [CH, 256]-wide tiles need up to 248 KB of shared memory, over
    # an H100 / H200 SM's 227 KB (cosFormer's 2d = 256 features failed so on the H200); 2 stages fit (180 KB).
    # Checked offline for sm_90 by tests/test_triton_fit.py (methods/triton_fit.py)
    stages = SCAN_STAGES if _block(dk) <= 128 else WIDE_SCAN_STAGES
    xs = grad_x.stride() if grad_x is not None else (0, 0, 0, 0)
    _kernel("scan")[grid](a, b, c, out, den, carried.states if has_s0 else anything,
                          carried.zsums if has_s0 and normalize else anything,
                          anything if e is None else e, carried.usums if has_u else anything,
                          anything if grad_x is None else grad_x,
                          seq, nseg, heads, heads // heads_a, heads // heads_b,
                          1 if grad_x is None else heads // grad_x.shape[1],
                          *a.stride(), *b.stride(), *c.stride(), *out.stride(), *xs, float(eps),
                          anything if active is None else active, 0.0 if floor is None else float(floor),
                          DK=dk, DV=dvv, BK=_block(dk), BV=bv, CH=chunk, SEG=seg_chunks,
                          HAS_S0=int(has_s0), HAS_U=int(has_u), TRANS_S=int(bool(carried.transposed)),
                          FEATURE=int(feature), NORM=int(normalize), EXTRA=extra,
                          DIVR=int(divide_rows is not None), GRADX=int(grad_x is not None),
                          REVERSE=int(reverse), MASK_INTRA=int(mask_intra), PRECISION=precision, DOT_T=dot_t,
                          FLOOR=int(floor is not None), num_warps=num_warps, num_stages=stages)
    return _result(out, den if normalize else None, carried if return_states else None)


def _result(out, den, carried):
    """``out``, ``(out, den)``, ``(out, carried)`` or ``(out, den, carried)``."""
    rest = tuple(x for x in (den, carried) if x is not None)
    return (out,) + rest if rest else out


class _LinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, chunk, block_v, eps, num_warps, mask_intra, seg_chunks, carry, carry_u,
                feature_map, floor, floor_grad):
        opts = dict(chunk=chunk, block_v=block_v, num_warps=num_warps, mask_intra=mask_intra,
                    seg_chunks=seg_chunks, carry=carry)
        active = None
        if feature_map == "identity":  # q, k are the features already (kernelised methods' own maps)
            fq = fk = None
            if floor is not None:  # rfa: max(den, floor) + eps, and where the floor holds (for the backward)
                active = torch.empty(q.shape[0], max(q.shape[1], k.shape[1]), q.shape[2], device=q.device,
                                     dtype=torch.float32)
            out, den, fwd = chunk_scan(q, k, v, eps=eps, normalize=True, return_states=True, floor=floor,
                                       active=active, **opts)
        elif feature_map == "precomputed":
            fq, fk = elu1(q), elu1(k)
            out, den, fwd = chunk_scan(fq, fk, v, eps=eps, normalize=True, return_states=True, **opts)
        else:  # "fused": φ applied as q, k are loaded (the backward computes them again)
            fq = fk = None
            out, den, fwd = chunk_scan(q, k, v, eps=eps, feature=True, normalize=True, return_states=True,
                                       **opts)
        ctx.save_for_backward(q, k, v, out, den, fq, fk, fwd.states, fwd.zsums,
                              active if floor_grad else None)
        ctx.opts = opts
        ctx.identity = feature_map == "identity"
        ctx.carry_u = carry_u
        return out

    @staticmethod
    def backward(ctx, dout):
        # With D_i the stored denominator, p = −(dO · out), dN = dO / D, dD = p / D (see the module docstring):
        #   dq = φ'(q) ⊙ (1/D_i) Σ_{j<=i} (dO_i·v_j + p_i) φk_j    (scan a=dO, b=v, c=φk, add_a=p, divide_rows=D)
        #   dk = φ'(k) ⊙ Σ_{i>=j} (v_j·dN_i + dD_i) φq_i            (reverse scan a=v, b=dN, c=φq, add_b=dD)
        #   dv =         Σ_{i>=j} (φk_j·φq_i) dN_i                  (reverse scan a=φk, b=φq, c=dN)
        q, k, v, out, den, fq, fk, s_fwd, z_fwd, active = ctx.saved_tensors
        opts = ctx.opts
        heads, kv_heads = q.shape[1], k.shape[1]
        group = heads // kv_heads
        identity = ctx.identity
        if identity:  # the gradients are the features' own: no chain rule of elu+1 (grad_x None)
            fq, fk = q, k
        elif fq is None:
            fq, fk = elu1(q), elu1(k)
        dn, p = _rows(1, dout, out, den, out_dtype=q.dtype)
        if active is not None:  # the floor: no gradient to the sum where max(sum, floor) took the floor
            p = p * active
        dd = p / den
        # dq: the forward's states are this scan's, transposed (Σ φk_jᵀ v_j vs Σ v_jᵀ φk_j), and its key sums
        # are this scan's Σ c: no state pass
        fwd = Carried(s_fwd, None, z_fwd, transposed=True)
        dq = chunk_scan(dout.to(q.dtype), v, fk, add_a=p, divide_rows=den, grad_x=None if identity else q,
                        carried=fwd,
                        carry_sums=ctx.carry_u, out_dtype=q.dtype, **opts)
        part = k.dtype if group == 1 else torch.float32  # GQA: per query head, summed over the group below
        dk, rev = chunk_scan(v, dn, fq, reverse=True, add_b=dd, grad_x=None if identity else k,
                             return_states=True, out_dtype=part,
                             carry_sums=ctx.carry_u, **opts)
        # dv: the dk scan's states, transposed (Σ dN_iᵀ φq_i vs Σ φq_iᵀ dN_i): no second state pass
        dv = chunk_scan(fk, fq, dn, reverse=True, carried=Carried(rev.states, transposed=True),
                        out_dtype=part, **opts)
        if group > 1:
            b, _, t, d = dk.shape
            dk = dk.view(b, kv_heads, group, t, d).sum(2).to(k.dtype)
            dv = dv.view(b, kv_heads, group, t, dv.shape[-1]).sum(2).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


FEATURE_MAPS = ("precomputed", "fused", "identity")
# the widest feature (and value) dimension a scan takes: one [chunk, width] register tile per operand (padded to a
# power of two in registers), as linear_attn_triton's max_head_dim
MAX_WIDTH = 256


def linear_attn(q, k, v, *, chunk: int = 64, block_v: int = 64, eps: float = 1e-6, num_warps: int = 4,
                seg_chunks: int = 4, feature_map: str = "precomputed", mask_intra: bool = True,
                carry: bool = True, carry_u: bool = True, floor: float | None = None, floor_grad: bool = True):
    """Causal linear attention with elu+1 features, normalised (``linear_attn``'s operator, self-attention,
    ``[B, H, T, D]`` inputs, GQA by kv heads), forward and backward in Triton. ``feature_map``:
    ``"precomputed"`` (φ(q), φ(k) written once by an elementwise pass and kept for the backward) or
    ``"fused"`` (φ applied in the scan kernels as q, k are loaded) or ``"identity"`` (q, k are the feature
    maps already, ``[B, H, T, m]`` with any width m <= ``MAX_WIDTH``, padded to a power of two in registers,
    which may differ from v's; no φ and no chain rule of φ in the backward: the gradients are those of the
    features, for the kernelised methods' ``impl: triton``, methods/linear/common.py). ``floor`` (identity
    features only; rfa's): the denominator is ``max(Σ_j φq_i·φk_j, floor) + eps`` as methods/linear/common.py's
    ``_den``, and the backward gives the sum no gradient on the rows where the floor holds (autograd of
    ``clamp_min``: the forward records those rows). ``mask_intra=False`` (the intra-chunk
    mask off), ``carry=False`` (segments start from a zero state), ``carry_u=False`` (the backward's dD
    terms lose the sums carried into each segment) and ``floor_grad=False`` (the backward passes the
    denominator's gradient through the floor) are deliberately broken variants for the tests' negative
    controls."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"linear_attn: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if feature_map == "identity":
        if q.shape[-1] != k.shape[-1] or q.shape[-1] > MAX_WIDTH or v.shape[-1] > MAX_WIDTH:
            raise ValueError(f"linear_attn: identity features need q, k of one width and q, k, v widths <= "
                             f"{MAX_WIDTH}, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"linear_attn: identity features need one dtype for q, k, v, got {q.dtype}, "
                            f"{k.dtype}, {v.dtype}")
    elif floor is not None:
        raise ValueError(f"linear_attn: floor applies to feature_map 'identity' only (elu+1 features are positive), "
                         f"got feature_map {feature_map!r}")
    return _LinearAttn.apply(q, k, v, chunk, block_v, eps, num_warps, mask_intra, seg_chunks, carry, carry_u,
                             feature_map, None if floor is None else float(floor), floor_grad)
