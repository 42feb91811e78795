"""Triton kernels of causal linear attention (elu+1 features, normalised): the fast path of
``linear_attn_triton`` (methods/linear/linear_attn.py). Imported lazily by the builder: importing this module
imports triton.

One generic kernel, :func:`_chunk_scan_src`, computes the chunked causal (or anti-causal) scan

    o_i = Σ_{j <= i} (a_i · b_j) c_j            (REVERSE: Σ_{j >= i})

with ``a, b`` ``[B, H, T, DK]`` and ``c`` ``[B, H, T, DV]``, in two kernels (fla's chunked structure):

- the state kernel :func:`_chunk_states_src`, grid ``(cdiv(DK, 64), cdiv(DV, BV), B · Hkv)``, walks the chunks
  in order (REVERSE: backwards) doing only the state update ``S += φ(b)ᵀ c`` (fp32; ``z += Σ φ(b)`` with
  NORM) and stores the state carried into every *segment* of ``seg_chunks`` chunks (fp32 ``[B·Hkv, NSEG,
  DK, DV]``: ``T / (chunk · seg_chunks) · DK · DV · 4`` bytes per kv head: 256 MiB per head at 1M tokens,
  d = 128, chunk 64, seg_chunks 4; storing one state per chunk would be 1 GiB per head, hence segments);
- the scan kernel :func:`_chunk_scan_src`, grid ``(cdiv(DV, BV), B · H, NSEG)``: each program loads its
  segment's state and walks the segment's chunks (outputs of the intra-chunk part ``tl.dot(a, bᵀ)`` masked
  to ``j <= i`` plus ``a · S``, and the state update in registers). One segment (short inputs): no state
  kernel. Before, one program per (value block, head) walked all chunks: 32 programs for 132 SMs at 16
  heads, the reason it lost to the PyTorch chunked form; now at 32K tokens 128 segments x 2 x 16 = 4096
  programs, and the sequential part is the state kernel's one small dot per chunk.

Operands of every ``tl.dot`` are in the input dtype (bf16/fp16 on
the tensor cores; fp32 inputs with ``input_precision="ieee"``, no tf32), accumulation in fp32.

- ``FEATURE=1`` applies ``φ(x) = elu(x) + 1`` to ``a`` and ``b`` as they are loaded (the forward pass on raw
  q, k: no feature tensors in memory);
- ``NORM=1`` also carries ``z = Σ b_j`` (fp32) and divides by ``den_i = a_i · z_i + Σ_{j<=i in chunk} a_i ·
  b_j + eps``, the denominator of ``linear_attn`` (methods/linear/common.py), stored (fp32) for the backward;
- head dims that are not a power of two (or below 16, ``tl.dot``'s minimum) are padded in registers with
  masked loads (feature columns beyond the head dim are forced to 0: ``φ(0) = 1`` would otherwise count);
- lengths that are not a multiple of the chunk: the tail chunk is masked (rows beyond ``T`` load as 0 and
  their features are forced to 0), nothing is padded in memory.

Backward (Triton as well): with ``D_i`` the stored denominator, ``dN = dO / D``, ``dD = -(dO · out) / D``,

    dφq_i = Σ_{j<=i} (dN_i · v_j) φk_j + dD_i Σ_{j<=i} φk_j     (scan a=dN, b=v, c=φk)
    dφk_j = Σ_{i>=j} (v_j · dN_i) φq_i + Σ_{i>=j} dD_i φq_i      (reverse scan a=v, b=dN, c=φq)
    dv_j  = Σ_{i>=j} (φk_j · φq_i) dN_i                         (reverse scan a=φk, b=φq, c=dN)

three calls of the same scan (``FEATURE=0, NORM=0``, fp32 outputs) plus two cumulative sums and the
elementwise chain rule of φ in PyTorch (fp32, in place; full-size fp32 temporaries are freed as soon as used:
at 1M tokens x 16 heads x 128 each is 8 GiB, and the former backward held about a dozen, hence its OOM).
GQA: the forward maps query head ``h`` to kv head ``h // group`` in the kernel (states per kv head); the
backward expands k, v to the query heads and sums the kv gradients over each group.

Not done (next steps): the dD · cumsum(φk) terms of the backward could be folded into the scans (carry
``Σ c`` like ``z``), saving two full-size fp32 passes; the three backward scans could share one state
pass and one kernel (fla's dq/dk/dv kernel); ``seg_chunks`` could adapt to the length (fewer, longer
segments at 1M where parallelism is ample).

Kernels are decorated on first use, once per interpreter mode: ``triton.jit`` reads ``TRITON_INTERPRET`` when
it decorates, so the CPU tests (which set it) and a GPU process get the right flavour whatever was imported
first.
"""

import triton
import triton.language as tl
import torch


def _chunk_scan_src(A, B, C, O, DEN, S0, Z0, T, NSEG, H, G,
                    sab, sah, sat, sad, sbb, sbh, sbt, sbd, scb, sch, sct, scd, sob, soh, sot, sod,
                    eps,
                    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
                    SEG: tl.constexpr, HAS_S0: tl.constexpr,
                    FEATURE: tl.constexpr, NORM: tl.constexpr, REVERSE: tl.constexpr,
                    MASK_INTRA: tl.constexpr, PRECISION: tl.constexpr, DOT_T: tl.constexpr):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    a_base = A + b.to(tl.int64) * sab + h.to(tl.int64) * sah
    b_base = B + b.to(tl.int64) * sbb + hk.to(tl.int64) * sbh
    c_base = C + b.to(tl.int64) * scb + hk.to(tl.int64) * sch
    o_base = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
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
    if HAS_S0:  # the state (and key sum) carried into this segment, from the state kernel, per kv head
        kv_seg = (b.to(tl.int64) * (H // G) + hk) * NSEG + seg
        state = tl.load(S0 + kv_seg * (DK * DV) + dk[:, None] * DV + dv[None, :],
                        mask=kmask[:, None] & vmask[None, :], other=0.0)
        zsum = tl.load(Z0 + kv_seg * DK + dk, mask=kmask, other=0.0)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
        zsum = tl.zeros([BK], dtype=tl.float32)
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
        scores = tl.where(visible, scores, 0.0)
        out = tl.dot(a, state.to(A.dtype.element_ty).to(DOT_T), input_precision=PRECISION)
        out += tl.dot(scores.to(C.dtype.element_ty).to(DOT_T), c, input_precision=PRECISION)
        if NORM:
            den = tl.sum(a.to(tl.float32) * zsum[None, :], axis=1) + tl.sum(scores, axis=1) + eps
            out = out / den[:, None]
            if pid_v == 0:
                tl.store(DEN + pid_bh.to(tl.int64) * T + t, den, mask=tmask)
            zsum += tl.sum(bb.to(tl.float32), axis=0)
        state += tl.dot(tl.trans(bb), c, input_precision=PRECISION)
        tl.store(o_base + t[:, None] * sot + dv[None, :] * sod, out.to(O.dtype.element_ty), mask=cv_mask)


def _chunk_states_src(B, C, S0, Z0, T, NSEG, H,
                      sbb, sbh, sbt, sbd, scb, sch, sct, scd,
                      DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
                      SEG: tl.constexpr, FEATURE: tl.constexpr, NORM: tl.constexpr, REVERSE: tl.constexpr,
                      PRECISION: tl.constexpr, NSEG_INTERP: tl.constexpr, DOT_T: tl.constexpr):
    """The states carried into every segment (of SEG chunks): grid (DK blocks, DV blocks, B · Hkv), each
    program walks the chunks in order (REVERSE: backwards) doing only the state update ``S += φ(b)ᵀ c`` (and
    ``z += Σ φ(b)`` with NORM) and stores the state at each segment start (fp32)."""
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    b_base = B + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    c_base = C + b.to(tl.int64) * scb + h.to(tl.int64) * sch
    rows = tl.arange(0, CH)
    dk = pid_k * BK + tl.arange(0, BK)
    dv = pid_v * BV + tl.arange(0, BV)
    kmask = dk < DK
    vmask = dv < DV
    s_base = S0 + pid_bh.to(tl.int64) * NSEG * (DK * DV) + dk[:, None] * DV + dv[None, :]
    s_mask = kmask[:, None] & vmask[None, :]
    z_base = Z0 + pid_bh.to(tl.int64) * NSEG * DK + dk
    z_mask = kmask & (pid_v == 0)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    zsum = tl.zeros([BK], dtype=tl.float32)
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
            if NORM:
                zsum += tl.sum(bb.to(tl.float32), axis=0)
            state += tl.dot(tl.trans(bb), c.to(DOT_T), input_precision=PRECISION)
    if REVERSE:
        last = 0
    else:
        last = NSEG - 1
    tl.store(s_base + tl.cast(last, tl.int64) * (DK * DV), state, mask=s_mask)
    if NORM:
        tl.store(z_base + tl.cast(last, tl.int64) * DK, zsum, mask=z_mask)


_KERNELS: dict[tuple[str, bool], object] = {}
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return bool(triton.knobs.runtime.interpret)


def _kernel(name: str = "scan"):
    key = (name, interpreting())
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit({"scan": _chunk_scan_src, "states": _chunk_states_src}[name])
    return _KERNELS[key]


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def chunk_scan(a, b, c, *, chunk: int, block_v: int, eps: float = 0.0, feature: bool = False,
               normalize: bool = False, reverse: bool = False, num_warps: int = 4, mask_intra: bool = True,
               seg_chunks: int = 4, out_dtype=None, carry: bool = True):
    """``o_i = Σ_{j<=i} (φ(a_i)·φ(b_j)) c_j`` (``reverse``: ``j >= i``), optionally divided by ``φ(a_i) ·
    Σ_{j<=i} φ(b_j) + eps`` (``normalize``; then also returns that denominator, fp32 ``[B, H, T]``).
    ``a`` ``[B, H, T, DK]``, ``b`` ``[B, Hkv, T, DK]``, ``c`` ``[B, Hkv, T, DV]`` (any strides, one dtype);
    the output has ``out_dtype`` (default ``c``'s dtype) and ``a``'s heads. ``φ`` is elu+1 when ``feature``
    else the identity. Segments of ``seg_chunks`` chunks run in parallel from the states the state kernel
    stored (fp32 ``[B·Hkv, NSEG, DK, DV]``); ``carry=False`` starts every segment from zero: a deliberately
    broken variant for the tests."""
    batch, heads, seq, dk = a.shape
    kv_heads = b.shape[1]
    dvv = c.shape[-1]
    if not (a.dtype == b.dtype == c.dtype):
        raise TypeError(f"chunk_scan: a, b, c must share one dtype, got {a.dtype}, {b.dtype}, {c.dtype}")
    if b.shape[:3] != c.shape[:3] or b.shape[-1] != dk or heads % kv_heads or b.shape[0] != batch \
            or b.shape[2] != seq:
        raise ValueError(f"chunk_scan: shapes do not fit: a {tuple(a.shape)}, b {tuple(b.shape)}, c {tuple(c.shape)}")
    out = torch.empty(batch, heads, seq, dvv, device=a.device, dtype=out_dtype or c.dtype)
    den = torch.empty(batch, heads, seq, device=a.device, dtype=torch.float32) if normalize else out
    if seq == 0:
        return (out, den) if normalize else out
    bv = min(block_v, _block(dvv))
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    n_chunks = triton.cdiv(seq, chunk)
    nseg = triton.cdiv(n_chunks, seg_chunks)
    # The interpreter's tl.dot is wrong on bf16/fp16 operands (numpy has no bf16): there the operands, already
    # rounded to the input dtype, are widened to fp32 before each dot (the same products a tensor core forms)
    dot_t = tl.float32 if interpreting() else _TL_DTYPES[a.dtype]
    states = zsums = None
    if nseg > 1 and carry:
        states = torch.empty(batch * kv_heads, nseg, dk, dvv, device=a.device, dtype=torch.float32)
        zsums = torch.empty(batch * kv_heads, nseg, dk, device=a.device, dtype=torch.float32) if normalize \
            else states
        bks = min(64, _block(dk))
        grid_s = (triton.cdiv(dk, bks), triton.cdiv(dvv, bv), batch * kv_heads)
        # Triton 3.6's interpreter cannot take a runtime scalar as a loop bound under numpy >= 2.3 (it calls
        # int() on a 1-element array): there the segment count is passed as a constexpr; compiled kernels loop
        # over the runtime ``NSEG`` (no recompilation per length).
        _kernel("states")[grid_s](b, c, states, zsums, seq, nseg, kv_heads, *b.stride(), *c.stride(),
                                  DK=dk, DV=dvv, BK=bks, BV=bv, CH=chunk, SEG=seg_chunks, FEATURE=int(feature),
                                  NORM=int(normalize), REVERSE=int(reverse), PRECISION=precision,
                                  NSEG_INTERP=nseg if interpreting() else 0, DOT_T=dot_t, num_warps=num_warps)
    grid = (triton.cdiv(dvv, bv), batch * heads, nseg)
    _kernel("scan")[grid](a, b, c, out, den, out if states is None else states, out if zsums is None else zsums,
                          seq, nseg, heads, heads // kv_heads,
                          *a.stride(), *b.stride(), *c.stride(), *out.stride(), float(eps),
                          DK=dk, DV=dvv, BK=_block(dk), BV=bv, CH=chunk, SEG=seg_chunks,
                          HAS_S0=int(states is not None), FEATURE=int(feature), NORM=int(normalize),
                          REVERSE=int(reverse), MASK_INTRA=int(mask_intra), PRECISION=precision, DOT_T=dot_t,
                          num_warps=num_warps)
    return (out, den) if normalize else out


def _elu1(x):
    return torch.nn.functional.elu(x) + 1.0


def _elu1_grad(x):
    """elu+1's derivative in fp32: 1 where x > 0, exp(x) elsewhere (``x`` is not modified)."""
    e = x.to(torch.float32, copy=True)
    return torch.where(e > 0, 1.0, e.exp_())


def _rev_cumsum(x, dim):
    return x.flip(dim).cumsum(dim).flip(dim)


class _LinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, chunk, block_v, eps, num_warps, mask_intra, seg_chunks, carry):
        out, den = chunk_scan(q, k, v, chunk=chunk, block_v=block_v, eps=eps, feature=True, normalize=True,
                              num_warps=num_warps, mask_intra=mask_intra, seg_chunks=seg_chunks, carry=carry)
        ctx.save_for_backward(q, k, v, out, den)
        ctx.opts = dict(chunk=chunk, block_v=block_v, num_warps=num_warps, mask_intra=mask_intra,
                        seg_chunks=seg_chunks, carry=carry)
        return out

    @staticmethod
    def backward(ctx, dout):
        # Full-size fp32 temporaries are freed as soon as used (at 1M tokens x 16 heads x 128 one is 8 GiB):
        # the scans write fp32 directly, the chain rule and the cumulative sums work in place.
        q, k, v, out, den = ctx.saved_tensors
        opts = ctx.opts
        heads, kv_heads = q.shape[1], k.shape[1]
        group = heads // kv_heads
        dt = q.dtype
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        fq_c = _elu1(q.float()).to(dt)
        fk_c = _elu1(k.float()).to(dt)
        g = dout.to(torch.float32, copy=True)  # a copy: divided in place below
        dd = torch.linalg.vecdot(g, out.float()).neg_().div_(den)  # [B, H, T]: -(dO · out) / D
        dn_c = g.div_(den[..., None]).to(dt)
        del g
        # dφq = scan(dN, v, φk) + dD · cumsum(φk); dq = dφq · φ'(q)
        dq = chunk_scan(dn_c, v, fk_c, out_dtype=torch.float32, **opts)
        dq.addcmul_(dd[..., None], fk_c.float().cumsum(2))  # cumsum: a new tensor
        dq.mul_(_elu1_grad(q))
        dq = dq.to(dt)
        # dφk = rscan(v, dN, φq) + rcumsum(dD · φq); dk = dφk · φ'(k)
        dk = chunk_scan(v, dn_c, fq_c, reverse=True, out_dtype=torch.float32, **opts)
        dk += _rev_cumsum(fq_c.float() * dd[..., None], 2)
        dk.mul_(_elu1_grad(k))
        dv = chunk_scan(fk_c, fq_c, dn_c, reverse=True, out_dtype=torch.float32 if group > 1 else v.dtype,
                        **opts)
        if group > 1:
            b, _, t, d = dk.shape
            dk = dk.view(b, kv_heads, group, t, d).sum(2)
            dv = dv.view(b, kv_heads, group, t, dv.shape[-1]).sum(2)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def linear_attn(q, k, v, *, chunk: int = 64, block_v: int = 64, eps: float = 1e-6, num_warps: int = 4,
                seg_chunks: int = 4, mask_intra: bool = True, carry: bool = True):
    """Causal linear attention with elu+1 features, normalised (``linear_attn``'s operator, self-attention,
    ``[B, H, T, D]`` inputs, GQA by kv heads), forward and backward in Triton. ``mask_intra=False`` (the
    intra-chunk mask off) and ``carry=False`` (segments start from a zero state) are deliberately broken
    variants for the tests' negative controls."""
    return _LinearAttn.apply(q, k, v, chunk, block_v, eps, num_warps, mask_intra, seg_chunks, carry)
