"""Triton kernels of causal linear attention (elu+1 features, normalised): the fast path of
``linear_attn_triton`` (methods/linear/linear_attn.py). Imported lazily by the builder: importing this module
imports triton.

One generic kernel, :func:`_chunk_scan_src`, computes the chunked causal (or anti-causal) scan

    o_i = Σ_{j <= i} (a_i · b_j) c_j            (REVERSE: Σ_{j >= i})

with ``a, b`` ``[B, H, T, DK]`` and ``c`` ``[B, H, T, DV]``. Grid ``(cdiv(DV, BV), B · H)``: each program
owns one value block of one (batch, head) and walks the chunks in order, carrying the ``DK x BV`` state
``Σ b_jᵀ c_j`` of the chunks before (fp32, in registers); inside a chunk the causal part is
``tl.dot(a, bᵀ)`` masked to ``j <= i``. Operands of every ``tl.dot`` are in the input dtype (bf16/fp16 on
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

three calls of the same kernel (``FEATURE=0, NORM=0``) plus two cumulative sums and the elementwise
chain rule of φ in PyTorch (fp32). GQA: the forward maps query head ``h`` to kv head ``h // group`` in the
kernel; the backward expands k, v to the query heads and sums the kv gradients over each group.

Kernels are decorated on first use, once per interpreter mode: ``triton.jit`` reads ``TRITON_INTERPRET`` when
it decorates, so the CPU tests (which set it) and a GPU process get the right flavour whatever was imported
first.
"""

import triton
import triton.language as tl
import torch


def _chunk_scan_src(A, B, C, O, DEN, T, NT, H, G,
                    sab, sah, sat, sad, sbb, sbh, sbt, sbd, scb, sch, sct, scd, sob, soh, sot, sod,
                    eps,
                    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
                    FEATURE: tl.constexpr, NORM: tl.constexpr, REVERSE: tl.constexpr,
                    MASK_INTRA: tl.constexpr, PRECISION: tl.constexpr, NT_INTERP: tl.constexpr,
                    DOT_T: tl.constexpr):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    state = tl.zeros([BK, BV], dtype=tl.float32)
    zsum = tl.zeros([BK], dtype=tl.float32)
    # NT_INTERP > 0 in the interpreter only (see chunk_scan); an expression, not an assignment, because the
    # interpreter turns every assigned value into a tensor
    for it in range(0, NT_INTERP if NT_INTERP > 0 else NT):
        if REVERSE:
            chunk = NT - 1 - it
        else:
            chunk = it
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


_KERNELS: dict[bool, object] = {}
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return bool(triton.knobs.runtime.interpret)


def _kernel():
    mode = interpreting()
    if mode not in _KERNELS:
        _KERNELS[mode] = triton.jit(_chunk_scan_src)
    return _KERNELS[mode]


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def chunk_scan(a, b, c, *, chunk: int, block_v: int, eps: float = 0.0, feature: bool = False,
               normalize: bool = False, reverse: bool = False, num_warps: int = 4, mask_intra: bool = True):
    """``o_i = Σ_{j<=i} (φ(a_i)·φ(b_j)) c_j`` (``reverse``: ``j >= i``), optionally divided by ``φ(a_i) ·
    Σ_{j<=i} φ(b_j) + eps`` (``normalize``; then also returns that denominator, fp32 ``[B, H, T]``).
    ``a`` ``[B, H, T, DK]``, ``b`` ``[B, Hkv, T, DK]``, ``c`` ``[B, Hkv, T, DV]`` (any strides, one dtype);
    the output has ``c``'s dtype and ``a``'s heads. ``φ`` is elu+1 when ``feature`` else the identity."""
    batch, heads, seq, dk = a.shape
    dvv = c.shape[-1]
    if not (a.dtype == b.dtype == c.dtype):
        raise TypeError(f"chunk_scan: a, b, c must share one dtype, got {a.dtype}, {b.dtype}, {c.dtype}")
    if b.shape[:3] != c.shape[:3] or b.shape[-1] != dk or heads % b.shape[1] or b.shape[0] != batch \
            or b.shape[2] != seq:
        raise ValueError(f"chunk_scan: shapes do not fit: a {tuple(a.shape)}, b {tuple(b.shape)}, c {tuple(c.shape)}")
    out = torch.empty(batch, heads, seq, dvv, device=a.device, dtype=c.dtype)
    den = torch.empty(batch, heads, seq, device=a.device, dtype=torch.float32) if normalize else out
    if seq == 0:
        return (out, den) if normalize else out
    bv = min(block_v, _block(dvv))
    grid = (triton.cdiv(dvv, bv), batch * heads)
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    n_chunks = triton.cdiv(seq, chunk)
    # Triton 3.6's interpreter cannot take a runtime scalar as a loop bound under numpy >= 2.3 (it calls
    # int() on a 1-element array): there the chunk count is passed as a constexpr; compiled kernels loop
    # over the runtime ``NT`` (no recompilation per length).
    nt_interp = n_chunks if interpreting() else 0
    # The interpreter's tl.dot is wrong on bf16/fp16 operands (numpy has no bf16): there the operands, already
    # rounded to the input dtype, are widened to fp32 before each dot (the same products a tensor core forms)
    dot_t = tl.float32 if interpreting() else _TL_DTYPES[a.dtype]
    _kernel()[grid](a, b, c, out, den, seq, n_chunks, heads, heads // b.shape[1],
                    *a.stride(), *b.stride(), *c.stride(), *out.stride(), float(eps),
                    DK=dk, DV=dvv, BK=_block(dk), BV=bv, CH=chunk, FEATURE=int(feature), NORM=int(normalize),
                    REVERSE=int(reverse), MASK_INTRA=int(mask_intra), PRECISION=precision,
                    NT_INTERP=nt_interp, DOT_T=dot_t,
                    num_warps=num_warps)
    return (out, den) if normalize else out


def _elu1(x):
    return torch.nn.functional.elu(x) + 1.0


def _elu1_grad(x):
    return torch.where(x > 0, torch.ones_like(x), torch.exp(x))


class _LinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, chunk, block_v, eps, num_warps, mask_intra):
        out, den = chunk_scan(q, k, v, chunk=chunk, block_v=block_v, eps=eps, feature=True, normalize=True,
                              num_warps=num_warps, mask_intra=mask_intra)
        ctx.save_for_backward(q, k, v, out, den)
        ctx.opts = dict(chunk=chunk, block_v=block_v, num_warps=num_warps, mask_intra=mask_intra)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, den = ctx.saved_tensors
        opts = ctx.opts
        heads, kv_heads = q.shape[1], k.shape[1]
        group = heads // kv_heads
        dt = q.dtype
        qf, kf = q.float(), k.float()
        if group > 1:
            kf, v = kf.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        fq, fk = _elu1(qf), _elu1(kf)
        g = dout.float()
        dn = g / den[..., None]
        dd = -(g * out.float()).sum(-1) / den  # [B, H, T]
        dn_c, fq_c, fk_c = dn.to(dt), fq.to(dt), fk.to(dt)
        dfq = chunk_scan(dn_c, v, fk_c, **opts).float() + dd[..., None] * fk.cumsum(2)
        wq = dd[..., None] * fq
        dfk = chunk_scan(v, dn_c, fq_c, reverse=True, **opts).float() + wq.flip(2).cumsum(2).flip(2)
        dv = chunk_scan(fk_c, fq_c, dn_c, reverse=True, **opts).float()
        dq = dfq * _elu1_grad(qf)
        dk = dfk * _elu1_grad(kf)
        if group > 1:
            b, _, t, d = dk.shape
            dk = dk.view(b, kv_heads, group, t, d).sum(2)
            dv = dv.view(b, kv_heads, group, t, dv.shape[-1]).sum(2)
        return dq.to(dt), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def linear_attn(q, k, v, *, chunk: int = 64, block_v: int = 64, eps: float = 1e-6, num_warps: int = 4,
                mask_intra: bool = True):
    """Causal linear attention with elu+1 features, normalised (``linear_attn``'s operator, self-attention,
    ``[B, H, T, D]`` inputs, GQA by kv heads), forward and backward in Triton. ``mask_intra=False`` is a
    deliberately broken variant for the tests' negative control."""
    return _LinearAttn.apply(q, k, v, chunk, block_v, eps, num_warps, mask_intra)
