"""Triton kernels of the delta rules' inter-chunk state loop (``impl: triton`` of gated_delta_rule, delta_rule
and simple_gla, methods/linear/gated_delta.py). Imported lazily by the builder: importing this module imports
triton.

Only the loop over chunks is replaced: :func:`gated_delta.chunk_pieces` (the WY pieces, batched over all
chunks) and :func:`gated_delta.chunk_outputs` (the outputs from the per-chunk states, batched) stay PyTorch;
with ``outputs: triton`` (:func:`chunk_forward`) the forward kernel also writes every chunk's outputs
``qg_c S_c + attn_c N_c`` (per V-block: ``qg_c`` [C, dk] and ``attn_c`` [C, C] loaded, ``S_c`` and ``N_c`` the
loop's own) and ``chunk_outputs`` runs in the backward only.
The loop (the math of :class:`gated_delta._ChunkStates`), per (batch, head), over the N chunks in order:

    states[c] = S;   N_c = U_c − W_c S   (no W, simple_gla: N_c = U_c);   S ← last_c · S + kd_cᵀ N_c

with ``U`` ``[B, H, N, C, dv]``, ``W`` and ``kd`` ``[B, H, N, C, dk]``, ``last`` ``[B, H, N]`` (the chunk's
total decay e^(γ_C)), ``S`` ``[dk, dv]``. In PyTorch each chunk is a few small launches, so at 16 heads,
d = 128 the method is launch-bound (8K tokens: 22 ms fwd, 69 ms fwd_bwd on the H200).

Kernels (one launch each way):

- :func:`_fwd_src`, grid ``(B · H, cdiv(dv, BLOCK_V))``: each program holds the state block
  ``S[:, vblock]`` (``[dk, BLOCK_V]``, fp32) in registers and walks the chunks in order, storing the state
  entering every chunk into ``states`` (fp32 ``[B, H, N, dk, dv]``, as the PyTorch loop) and the final state.
  The state's columns are independent (``W_c S`` and ``kd_cᵀ N_c`` mix rows only), so V-blocks need no
  communication.
- :func:`_bwd_src`, same grid: the reverse walk with ``dS`` (the gradient of the state leaving chunk c,
  ``[dk, BLOCK_V]`` fp32, from the final state's gradient or zero) in registers:

      dN_c = kd_c dS → dU_c;   N_c = U_c − W_c S_c (recomputed from the stored states[c]);
      dkd_c += N_c dSᵀ;   dlast_c += ⟨S_c, dS⟩;   dW_c += −dN_c S_cᵀ;
      dS ← last_c · dS − W_cᵀ dN_c + dstates[c]

  and ``dstate0`` the final ``dS``. ``dU`` is per value column: written directly. ``dkd``, ``dW`` and
  ``dlast`` are sums over the value columns: each V-block writes its partial into a ``[NV, ...]`` fp32 buffer,
  summed in PyTorch afterwards (no atomics: deterministic; no buffer and no sum with one V-block).

Everything is fp32 (inputs, states, registers, outputs); ``tl.dot`` runs with ``input_precision``
``dot_precision``: ``tf32`` (the default: tensor cores, ~1e-3 relative rounding per product, as fla's kernels
round the state to bf16 for the same dots), ``ieee`` (full fp32 as the PyTorch path's fp32 matmuls; on the
GPU it spills heavily, see :data:`DEFAULTS`) or ``bf16`` (as fla's ``chunk_gated_delta_rule_fwd_kernel_h`` and
its backward: every dot operand, the state among them, rounded to bf16 (round to nearest even; unit roundoff
u = 2⁻⁸ ≈ 3.9e-3, so a product of two rounded operands errs by <= 2u + u² relative) just before the dot, the
products accumulated in fp32 by the bf16 tensor-core MMA; the state itself is carried and updated in fp32 and
stored in fp32; the loads and stores are fp32 as before, only the dots' operand tiles are bf16). Triton's CPU
interpreter cannot run bf16 dots (see :func:`_operand_emulated`): there the rounding is emulated on fp32 bits,
so the CPU tests prove which operands are rounded and how (against a PyTorch emulation of the same rounding)
and that the error against the fp32 loop is what bf16 rounding gives; the GPU's own conversion and MMA are
proved only by the device gate. Shapes: ``tl.dot`` needs every
dimension >= 16 and ``tl.arange`` powers of two, so the chunk C and dk are padded in registers to the next
power of two >= 16 with masked loads (padded rows of U, W, kd load as 0 and so write nothing; padded state
rows stay 0); dv is covered by V-blocks of ``block_v`` (masked at the edge). Inputs are read through their
strides (``U`` and ``W`` are views of one solve's output), nothing is copied.

Parameters: ``block_v`` (value columns per program, a power of two 16..128, default 32: fewer columns mean
more programs, B · H · cdiv(dv, block_v), and fewer registers, but more partial-sum traffic in the backward),
``num_warps`` (default 4), ``dot_precision``, ``num_stages`` (default: 2 up to dk 128, 1 above). Chunks up
to :data:`MAX_CHUNK` tokens and head dims up to
:data:`MAX_DIM` (the state block, one chunk's W and kd tiles live in registers).

``skip_w=True`` drops the ``W_c S`` term in both kernels, ``state_bf16=True`` (forward, with bf16) rounds the
carried state itself to bf16 after every chunk (fla keeps it fp32): deliberately broken variants for the tests'
negative controls. Kernels are decorated on first use, once per interpreter mode (linear_triton.jit_kernel).
"""

import torch
import triton
import triton.language as tl

from .linear_triton import _block, interpreting, jit_kernel

MAX_CHUNK = 256
MAX_DIM = 256
PRECISIONS = ("ieee", "tf32", "bf16")
# Defaults chosen offline (methods/triton_fit.py: the launches compiled for sm_90, chunk 64, dk = dv = 128; KB of
# shared memory fwd / bwd and spilled bytes per thread, 4 warps): block_v 64 at 3 stages needs 196 / 294 KB
# (ieee) and 278 / 278 KB (tf32), over the H200's 227 KB; ieee dots spill 5-100 KB per thread at block_v >= 32
# (no tensor cores: the fp32 FMA dot keeps its operands in registers); tf32 at block_v 32, 2 stages: 168 / 176
# KB, 0 / 1.4 KB spilled. tests/test_triton_fit.py holds the defaults to the limit. Not yet timed on the H200.
# dot_precision bf16 at the same defaults: 88 / 124 KB, 0 / 1.1 KB spilled (255 registers both; 8 warps: 0 / 0.5
# KB; block_v 64: 96 / 168 KB, 0.14 / 2.2 KB); its bf16 operand tiles halve the dots' shared memory. Not timed.
DEFAULTS = dict(block_v=32, num_warps=4, dot_precision="tf32")
# The forward kernel with the outputs (chunk_forward, outputs: triton) holds a chunk's qg [C, dk] and attn [C, C]
# tiles besides and needs its own launch settings (triton_fit, sm_90, chunk 64, dk = dv = 128, block_v 32; KB of
# shared memory, spilled bytes per thread, registers): tf32 at the loop's defaults (4 warps, 2 stages) 264 KB,
# over the H200's 227 KB; 1 stage, 4 warps: 56 KB but 464 / 332 B spilled; 1 stage, 8 warps: 56 KB, 0 spilled,
# 255 registers; bf16 at 8 warps: 136 KB (2 stages) / 44 KB (1 stage), 0 spilled. So 8 warps and 1 stage for
# that launch unless num_warps / num_stages are given (tests/test_triton_fit.py). Not yet timed on the H200.
OUTPUT_DEFAULTS = dict(num_warps=8, num_stages=1)


def _operand_src(x, BF16: tl.constexpr):
    """A dot operand: ``x`` as it is (fp32: the dot's ``input_precision`` rounds it, tf32 or not at all) or,
    with ``BF16``, ``x`` rounded to bf16 (round to nearest even, Triton's default fp32 -> bf16 conversion): the
    tensor-core bf16 dot then accumulates the exact products in fp32. ``x`` itself (the carried state among
    them) stays fp32."""
    if BF16:
        y = x.to(tl.bfloat16)
    else:
        y = x
    return y


def _operand_emulated(x, BF16):
    """:func:`_operand_src` for Triton's CPU interpreter (3.6), whose bf16 is not usable for this: its fp32 ->
    bf16 cast truncates (round toward zero, not the GPU's round to nearest even) and its ``tl.dot`` multiplies
    bf16 operands as their raw uint16 bit patterns (it converts fp8 operands only). So the interpreter rounds
    to nearest even by hand on the fp32 bits and keeps the bf16 value in fp32; its numpy fp32 dot of those
    operands is then the GPU's bf16 dot up to the order of the fp32 accumulation (the products of two bf16
    values, 8 + 8 significant bits, are exact in fp32 either way). A plain function: the interpreter runs
    kernels as Python (chosen at import, as Triton reads ``TRITON_INTERPRET`` once)."""
    if BF16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # finite inputs (a carry into the exponent is right)
        x = bits.to(tl.float32, bitcast=True)
    return x


_operand = _operand_emulated if interpreting() else triton.jit(_operand_src)


def _fwd_src(U, W, KD, LAST, S0, STATES, SF, QG, ATTN, OUT, N, H, C,
             sub, suh, sun, suc, sud, swb, swh, swn, swc, swd, skb, skh, skn, skc, skd,
             slb, slh, sln, s0b, s0h, s0k, s0v, sqb, sqh, sqn, sqc, sqd, sab, sah, san, sar, sac,
             DK: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             HAS_W: tl.constexpr, HAS_OUT: tl.constexpr, STORE_STATES: tl.constexpr, PRECISION: tl.constexpr,
             BF16: tl.constexpr, FAULT: tl.constexpr, N_INTERP: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.arange(0, BC)
    kk = tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    rmask = rows < C
    kmask = kk < DK
    vmask = vv < DV
    uv_mask = rmask[:, None] & vmask[None, :]
    wk_mask = rmask[:, None] & kmask[None, :]
    s_mask = kmask[:, None] & vmask[None, :]
    u_ptr = U + b * sub + h * suh + rows[:, None] * suc + vv[None, :] * sud
    w_ptr = W + b * swb + h * swh + rows[:, None] * swc + kk[None, :] * swd
    k_ptr = KD + b * skb + h * skh + rows[:, None] * skc + kk[None, :] * skd
    l_ptr = LAST + b * slb + h * slh
    st_ptr = STATES + pid_bh.to(tl.int64) * N * (DK * DV) + kk[:, None] * DV + vv[None, :]
    # HAS_OUT: each chunk's outputs qg_c S_c + attn_c N_c for this V-block, into OUT [B, H, N, C, DV] (contiguous)
    q_ptr = QG + b * sqb + h * sqh + rows[:, None] * sqc + kk[None, :] * sqd
    a_ptr = ATTN + b * sab + h * sah + rows[:, None] * sar + rows[None, :] * sac
    a_mask = rmask[:, None] & rmask[None, :]
    o_ptr = OUT + pid_bh.to(tl.int64) * N * (C * DV) + rows[:, None] * DV + vv[None, :]
    S = tl.load(S0 + b * s0b + h * s0h + kk[:, None] * s0k + vv[None, :] * s0v, mask=s_mask, other=0.0)
    # N_INTERP > 0 in the interpreter only: Triton 3.6's interpreter cannot take a runtime scalar as a loop
    # bound under numpy >= 2.3 (as in linear_triton.chunk_scan); compiled kernels loop over the runtime N
    for i in range(0, N_INTERP if N_INTERP > 0 else N):
        c = tl.cast(i, tl.int64)
        if STORE_STATES:
            tl.store(st_ptr + c * (DK * DV), S, mask=s_mask)
        S_op = _operand(S, BF16)
        new = tl.load(u_ptr + c * sun, mask=uv_mask, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + c * swn, mask=wk_mask, other=0.0)
            new -= tl.dot(_operand(w, BF16), S_op, input_precision=PRECISION)
        new_op = _operand(new, BF16)
        if HAS_OUT:
            qg = tl.load(q_ptr + c * sqn, mask=wk_mask, other=0.0)
            o = tl.dot(_operand(qg, BF16), S_op, input_precision=PRECISION)
            if FAULT != 2:  # FAULT 2, the broken variant: the intra-chunk term attn_c N_c dropped
                a = tl.load(a_ptr + c * san, mask=a_mask, other=0.0)
                o += tl.dot(_operand(a, BF16), new_op, input_precision=PRECISION)
            tl.store(o_ptr + c * (C * DV), o, mask=uv_mask)
        kd = tl.load(k_ptr + c * skn, mask=wk_mask, other=0.0)
        decay = tl.load(l_ptr + c * sln)
        S = decay * S + tl.dot(_operand(tl.trans(kd), BF16), new_op, input_precision=PRECISION)
        if FAULT == 1:  # the broken variant: the carried state itself rounded to bf16 (fla keeps it fp32)
            S = _operand(S, 1).to(tl.float32)
    tl.store(SF + pid_bh.to(tl.int64) * (DK * DV) + kk[:, None] * DV + vv[None, :], S, mask=s_mask)


def _bwd_src(U, W, KD, LAST, STATES, DSTATES, DSF, DU, DW, DKD, DLAST, DS0, N, H, C, BH,
             sub, suh, sun, suc, sud, swb, swh, swn, swc, swd, skb, skh, skn, skc, skd,
             slb, slh, sln, sdb, sdh, sdn, sdk, sdv, sfb, sfh, sfk, sfv,
             DK: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             HAS_W: tl.constexpr, HAS_DSTATES: tl.constexpr, HAS_DSF: tl.constexpr, NEED_DU: tl.constexpr,
             NEED_DW: tl.constexpr, NEED_DKD: tl.constexpr, NEED_DLAST: tl.constexpr, NEED_DS0: tl.constexpr,
             PRECISION: tl.constexpr, BF16: tl.constexpr, N_INTERP: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    rows = tl.arange(0, BC)
    kk = tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    rmask = rows < C
    kmask = kk < DK
    vmask = vv < DV
    uv_mask = rmask[:, None] & vmask[None, :]
    wk_mask = rmask[:, None] & kmask[None, :]
    s_mask = kmask[:, None] & vmask[None, :]
    u_ptr = U + b * sub + h * suh + rows[:, None] * suc + vv[None, :] * sud
    w_ptr = W + b * swb + h * swh + rows[:, None] * swc + kk[None, :] * swd
    k_ptr = KD + b * skb + h * skh + rows[:, None] * skc + kk[None, :] * skd
    l_ptr = LAST + b * slb + h * slh
    st_ptr = STATES + bh * N * (DK * DV) + kk[:, None] * DV + vv[None, :]
    ds_ptr = DSTATES + b * sdb + h * sdh + kk[:, None] * sdk + vv[None, :] * sdv
    # outputs, contiguous: dU [B, H, N, C, DV]; partials dW, dkd [NV, B, H, N, C, DK], dlast [NV, B, H, N]
    du_ptr = DU + bh * N * (C * DV) + rows[:, None] * DV + vv[None, :]
    part = pid_v.to(tl.int64) * BH + bh
    dw_ptr = DW + part * N * (C * DK) + rows[:, None] * DK + kk[None, :]
    dkd_ptr = DKD + part * N * (C * DK) + rows[:, None] * DK + kk[None, :]
    dl_ptr = DLAST + part * N
    if HAS_DSF:
        dS = tl.load(DSF + b * sfb + h * sfh + kk[:, None] * sfk + vv[None, :] * sfv, mask=s_mask, other=0.0)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, N_INTERP if N_INTERP > 0 else N):  # N_INTERP: see _fwd_src
        c = tl.cast(N - 1 - i, tl.int64)
        S_c = tl.load(st_ptr + c * (DK * DV), mask=s_mask, other=0.0)
        kd = tl.load(k_ptr + c * skn, mask=wk_mask, other=0.0)
        dS_op = _operand(dS, BF16)  # the dot operands, each rounded once per chunk (bf16) or as they are
        S_op = _operand(S_c, BF16)
        dnew = tl.dot(_operand(kd, BF16), dS_op, input_precision=PRECISION)  # [BC, BV]
        if NEED_DU:
            tl.store(du_ptr + c * (C * DV), dnew, mask=uv_mask)
        dnew_op = _operand(dnew, BF16)
        if HAS_W:
            w = tl.load(w_ptr + c * swn, mask=wk_mask, other=0.0)
        if NEED_DKD:
            new = tl.load(u_ptr + c * sun, mask=uv_mask, other=0.0)
            if HAS_W:
                new -= tl.dot(_operand(w, BF16), S_op, input_precision=PRECISION)
            tl.store(dkd_ptr + c * (C * DK), tl.dot(_operand(new, BF16), tl.trans(dS_op), input_precision=PRECISION),
                     mask=wk_mask)
        if NEED_DLAST:
            tl.store(dl_ptr + c, tl.sum(tl.sum(S_c * dS, axis=1), axis=0))
        if HAS_W:
            if NEED_DW:
                tl.store(dw_ptr + c * (C * DK), -tl.dot(dnew_op, tl.trans(S_op), input_precision=PRECISION),
                         mask=wk_mask)
        decay = tl.load(l_ptr + c * sln)
        dS = decay * dS
        if HAS_W:
            dS -= tl.dot(_operand(tl.trans(w), BF16), dnew_op, input_precision=PRECISION)
        if HAS_DSTATES:
            dS += tl.load(ds_ptr + c * sdn, mask=s_mask, other=0.0)
    if NEED_DS0:
        tl.store(DS0 + bh * (DK * DV) + kk[:, None] * DV + vv[None, :], dS, mask=s_mask)


def _kernel(name: str):
    return jit_kernel({"fwd": _fwd_src, "bwd": _bwd_src}[name])


def _check(U, W, kd, last, state0, block_v, dot_precision):
    batch, heads, n, chunk, dv = U.shape
    dk = kd.shape[-1]
    for name, t in (("U", U), ("W", W), ("kd", kd), ("last", last), ("state0", state0)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"delta_triton.chunk_states: {name} must be float32, got {t.dtype}")
    shapes_ok = (kd.shape == (batch, heads, n, chunk, dk) and (W is None or W.shape == kd.shape)
                 and last.shape == (batch, heads, n) and state0.shape == (batch, heads, dk, dv))
    if not shapes_ok:
        raise ValueError(f"delta_triton.chunk_states: shapes do not fit: U {tuple(U.shape)}, "
                         f"W {None if W is None else tuple(W.shape)}, kd {tuple(kd.shape)}, "
                         f"last {tuple(last.shape)}, state0 {tuple(state0.shape)}")
    if chunk > MAX_CHUNK or dk > MAX_DIM or dv > MAX_DIM:
        raise ValueError(f"delta_triton.chunk_states: chunk <= {MAX_CHUNK}, dk and dv <= {MAX_DIM} only, got "
                         f"chunk {chunk}, dk {dk}, dv {dv}")
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"delta_triton.chunk_states: block_v must be a power of two >= 16, got {block_v}")
    if dot_precision not in PRECISIONS:
        raise ValueError(f"delta_triton.chunk_states: dot_precision must be one of {PRECISIONS}, "
                         f"got {dot_precision!r}")


def _strides(t, like):
    """Strides of ``t`` (the 5-d pieces), or of ``like`` where ``t`` is None (the pointer is never read)."""
    return (t if t is not None else like).stride()


def _stages(num_stages, dk: int) -> int:
    """The software pipeline's depth: ``num_stages`` as given, else 2 up to 128-wide states and 1 above (the
    prefetched W / kd / U tiles of the next chunk; see :data:`DEFAULTS`)."""
    return num_stages if num_stages else (2 if _block(dk) <= 128 else 1)


def _precision(dot_precision: str) -> dict:
    """The kernels' constexprs for ``dot_precision``: bf16 rounds the operands itself (:func:`_operand_src`) and
    leaves ``tl.dot`` its default ``input_precision`` (tf32, which bf16 operands do not use), as fla's kernels."""
    bf16 = dot_precision == "bf16"
    return dict(PRECISION="tf32" if bf16 else dot_precision, BF16=int(bf16))


def states_forward(U, W, kd, last, state0, *, block_v=DEFAULTS["block_v"], num_warps=DEFAULTS["num_warps"],
                   dot_precision=DEFAULTS["dot_precision"], num_stages=None, skip_w=False, state_bf16=False,
                   qg=None, attn=None, store_states=True, drop_attn=False):
    """The forward kernel: (states [B, H, N, dk, dv] fp32, the state entering each chunk; the final state
    [B, H, dk, dv] fp32). No autograd (see :func:`chunk_states`).

    With ``qg`` ([B, H, N, C, dk]) and ``attn`` ([B, H, N, C, C]), fp32: the kernel also writes every chunk's
    outputs ``qg_c S_c + attn_c (U_c − W_c S_c)`` and returns (states, final, outputs [B, H, N, C, dv] fp32)
    (:func:`chunk_forward`); ``store_states=False`` then skips the states (returned as None: no backward
    needs them). ``drop_attn=True`` drops the ``attn_c N_c`` term: a deliberately broken variant for the
    tests' negative control."""
    _check(U, W, kd, last, state0, block_v, dot_precision)
    batch, heads, n, chunk, dv = U.shape
    dk = kd.shape[-1]
    has_out = qg is not None
    if has_out:
        for name, t, shape in (("qg", qg, kd.shape), ("attn", attn, (batch, heads, n, chunk, chunk))):
            if t is None or t.dtype != torch.float32 or tuple(t.shape) != tuple(shape):
                raise ValueError(f"delta_triton.states_forward: {name} must be float32 {tuple(shape)}, got "
                                 f"{None if t is None else (t.dtype, tuple(t.shape))}")
    if not has_out and not store_states:
        raise ValueError("delta_triton.states_forward: store_states=False needs the outputs (qg, attn)")
    dev = U.device
    states = torch.empty(batch, heads, n, dk, dv, device=dev, dtype=torch.float32) if store_states else None
    final = torch.empty(batch, heads, dk, dv, device=dev, dtype=torch.float32)
    out = torch.empty(batch, heads, n, chunk, dv, device=dev, dtype=torch.float32) if has_out else None
    if n == 0:
        final.copy_(state0)
        return (states, final, out) if has_out else (states, final)
    has_w = W is not None and not skip_w
    bv = min(block_v, _block(dv))
    grid = (batch * heads, triton.cdiv(dv, bv))
    fault = 2 if drop_attn else int(state_bf16)
    _kernel("fwd")[grid](U, W if has_w else kd, kd, last, state0, final if states is None else states, final,
                         qg if has_out else kd, attn if has_out else kd, out if has_out else final,
                         n, heads, chunk,
                         *U.stride(), *_strides(W if has_w else None, kd), *kd.stride(), *last.stride(),
                         *state0.stride(), *(qg if has_out else kd).stride(), *(attn if has_out else kd).stride(),
                         DK=dk, DV=dv, BC=_block(chunk), BK=_block(dk), BV=bv, HAS_W=int(has_w),
                         HAS_OUT=int(has_out), STORE_STATES=int(store_states),
                         **_precision(dot_precision), FAULT=fault,
                         N_INTERP=n if interpreting() else 0, num_warps=num_warps,
                         num_stages=_stages(num_stages, dk))
    return (states, final, out) if has_out else (states, final)


def states_backward(U, W, kd, last, states, dstates, dfinal, needs, *, block_v=DEFAULTS["block_v"],
                    num_warps=DEFAULTS["num_warps"], dot_precision=DEFAULTS["dot_precision"], num_stages=None,
                    skip_w=False, state_bf16=False):
    """The backward kernel: (dU, dW, dkd, dlast, dstate0), each None where ``needs`` (five flags, as
    ``ctx.needs_input_grad``) says it is not wanted (dW also where W is None). ``dstates`` ([B, H, N, dk, dv])
    and ``dfinal`` ([B, H, dk, dv]) may be None (no gradient flows into them)."""
    batch, heads, n, chunk, dv = U.shape
    dk = kd.shape[-1]
    need_u, need_w, need_kd, need_last, need_s0 = needs
    has_w = W is not None and not skip_w
    need_w = need_w and W is not None
    bv = min(block_v, _block(dv))
    nv = triton.cdiv(dv, bv)
    dev, f32 = U.device, torch.float32
    dU = torch.empty(batch, heads, n, chunk, dv, device=dev, dtype=f32) if need_u else None
    dW = torch.empty(nv, batch, heads, n, chunk, dk, device=dev, dtype=f32) if need_w else None
    dkd = torch.empty(nv, batch, heads, n, chunk, dk, device=dev, dtype=f32) if need_kd else None
    dlast = torch.empty(nv, batch, heads, n, device=dev, dtype=f32) if need_last else None
    ds0 = torch.empty(batch, heads, dk, dv, device=dev, dtype=f32) if need_s0 else None
    if need_w and not has_w:  # skip_w: the broken variant's W gets no gradient
        dW.zero_()
    if n == 0:
        if need_s0:
            ds0.copy_(dfinal if dfinal is not None else torch.zeros_like(ds0))
        return dU, dW, dkd, dlast, ds0
    for t in (dstates, dfinal):
        if t is not None and t.dtype != f32:
            raise TypeError(f"delta_triton.states_backward: gradients must be float32, got {t.dtype}")
    dummy = states  # a pointer for arguments that are never read or written (constexpr flags off)
    grid = (batch * heads, nv)
    _kernel("bwd")[grid](U, W if has_w else kd, kd, last, states, dummy if dstates is None else dstates,
                         dummy if dfinal is None else dfinal, dummy if dU is None else dU,
                         dummy if (dW is None or not has_w) else dW, dummy if dkd is None else dkd,
                         dummy if dlast is None else dlast, dummy if ds0 is None else ds0,
                         n, heads, chunk, batch * heads,
                         *U.stride(), *_strides(W if has_w else None, kd), *kd.stride(), *last.stride(),
                         *(dstates.stride() if dstates is not None else states.stride()),
                         *(dfinal.stride() if dfinal is not None else (0, 0, 0, 0)),
                         DK=dk, DV=dv, BC=_block(chunk), BK=_block(dk), BV=bv, HAS_W=int(has_w),
                         HAS_DSTATES=int(dstates is not None), HAS_DSF=int(dfinal is not None),
                         NEED_DU=int(need_u), NEED_DW=int(need_w and has_w), NEED_DKD=int(need_kd),
                         NEED_DLAST=int(need_last), NEED_DS0=int(need_s0), **_precision(dot_precision),
                         N_INTERP=n if interpreting() else 0, num_warps=num_warps,
                         num_stages=_stages(num_stages, dk))
    # the sums over V-blocks (fp32, in PyTorch: deterministic); one V-block: the buffer's only slice, no copy
    dW, dkd, dlast = (None if t is None else (t[0] if nv == 1 else t.sum(0)) for t in (dW, dkd, dlast))
    return dU, dW, dkd, dlast, ds0


class _ChunkStatesTriton(torch.autograd.Function):
    """:func:`gated_delta.chunk_states` through the Triton kernels: the same inputs, outputs and gradients
    (see :class:`gated_delta._ChunkStates`); saves the inputs and the stacked states only."""

    @staticmethod
    def forward(ctx, U, W, kd, last, state0, opts):
        states, final = states_forward(U, W, kd, last, state0, **opts)
        ctx.save_for_backward(U, W, kd, last, states)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return states, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dstates, dfinal):
        U, W, kd, last, states = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        grads = states_backward(U, W, kd, last, states, dstates, dfinal, needs, **ctx.opts)
        return (*grads, None)


def chunk_states(U, W, kd, last, state0, *, block_v=DEFAULTS["block_v"], num_warps=DEFAULTS["num_warps"],
                 dot_precision=DEFAULTS["dot_precision"], num_stages=None, skip_w=False, state_bf16=False):
    """The loop over chunks through the Triton kernels: (states [B, H, N, dk, dv], final state [B, H, dk, dv]),
    differentiable in every input (``W`` may be None: simple_gla). Drop-in for
    :func:`gated_delta.chunk_states` (fp32 inputs, CUDA or ``TRITON_INTERPRET=1``)."""
    opts = dict(block_v=block_v, num_warps=num_warps, dot_precision=dot_precision, num_stages=num_stages,
                skip_w=skip_w, state_bf16=state_bf16)
    return _ChunkStatesTriton.apply(U, W, kd, last, state0, opts)


class _ChunkForwardTriton(torch.autograd.Function):
    """:func:`chunk_forward`: the chunk loop and every chunk's outputs by the forward kernel. Backward: the
    outputs' part through :func:`gated_delta.chunk_outputs` (PyTorch autograd on the saved states: the
    gradients of qg, attn, U, W and of the states), then the loop's through :func:`states_backward` with those
    state gradients, the two parts of U's and W's gradients summed: the same computation as the default path
    (``chunk_states`` then ``chunk_outputs``) takes backward. Saves the inputs and the stacked states (as
    :class:`_ChunkStatesTriton`); forward only (no input needs a gradient), the states are not stored."""

    @staticmethod
    def forward(ctx, qg, attn, U, W, kd, last, state0, opts, store_states):
        launch = dict(opts, num_warps=opts["fwd_num_warps"], num_stages=opts["fwd_num_stages"])
        del launch["fwd_num_warps"], launch["fwd_num_stages"]
        states, final, out = states_forward(U, W, kd, last, state0, qg=qg, attn=attn, store_states=store_states,
                                            **launch)
        ctx.save_for_backward(qg, attn, U, W, kd, last, states)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dfinal):
        from .gated_delta import chunk_outputs

        qg, attn, U, W, kd, last, states = ctx.saved_tensors
        need_qg, need_attn, need_u, need_w, need_kd, need_last, need_s0 = ctx.needs_input_grad[:7]
        need_w = need_w and W is not None
        dqg = dattn = dU_out = dW_out = dstates = None
        if dout is not None:
            with torch.enable_grad():
                wants = (need_qg, need_attn, need_u, need_w, True)
                leaves = [None if t is None else t.detach().requires_grad_(want)
                          for t, want in zip((qg, attn, U, W, states), wants)]
                out = chunk_outputs(*leaves, bf16=ctx.opts["dot_precision"] == "bf16")
                asked = [t for t, want in zip(leaves, wants) if want]
                got = iter(torch.autograd.grad(out, asked, dout))
            dqg, dattn, dU_out, dW_out, dstates = (next(got) if want else None for want in wants)
        dU, dW, dkd, dlast, ds0 = states_backward(U, W, kd, last, states, dstates, dfinal,
                                                  (need_u, need_w, need_kd, need_last, need_s0),
                                                  **{k: v for k, v in ctx.opts.items() if k in BACKWARD_OPTS})
        dU = dU if dU_out is None else dU_out + dU
        dW = dW if dW_out is None else dW_out + dW
        return dqg, dattn, dU, dW, dkd, dlast, ds0, None, None


BACKWARD_OPTS = ("block_v", "num_warps", "dot_precision", "num_stages", "skip_w", "state_bf16")


def chunk_forward(qg, attn, U, W, kd, last, state0, *, block_v=DEFAULTS["block_v"], num_warps=DEFAULTS["num_warps"],
                  dot_precision=DEFAULTS["dot_precision"], num_stages=None, skip_w=False, state_bf16=False,
                  fwd_num_warps=OUTPUT_DEFAULTS["num_warps"], fwd_num_stages=OUTPUT_DEFAULTS["num_stages"],
                  drop_attn=False):
    """The loop over chunks and every chunk's outputs by the forward kernel (``outputs: triton`` of
    ``impl: triton``, see :func:`gated_delta.states_impl`): (outputs [B, H, N, C, dv] fp32, final state
    [B, H, dk, dv]), differentiable in every input (``W`` may be None: simple_gla). Replaces
    ``chunk_states`` followed by :func:`gated_delta.chunk_outputs` (``qg @ S + attn @ (U − W @ S)``, three
    fp32 matmuls over all chunks and their elementwise kernels): the kernel has each chunk's entering state
    block and ``N_c = U_c − W_c S_c`` in registers for the recurrence already, and adds ``qg_c S_c[:, vblock]``
    and ``attn_c N_c[:, vblock]`` (two more dots per chunk, with the loop's ``dot_precision``; bf16: operands
    rounded, fp32 accumulation, the sum kept in fp32, where :func:`gated_delta.chunk_outputs`' bf16 form also
    rounds each matmul's result to bf16). The states are stored only where a gradient is wanted (the backward
    needs them); otherwise the forward writes the outputs and the final state alone. The forward kernel
    launches with ``fwd_num_warps`` and ``fwd_num_stages`` (default :data:`OUTPUT_DEFAULTS`: its extra tiles do
    not fit sm_90's shared memory at the loop's 2 stages), the backward kernel with ``num_warps`` and
    ``num_stages``."""
    opts = dict(block_v=block_v, num_warps=num_warps, dot_precision=dot_precision, num_stages=num_stages,
                skip_w=skip_w, state_bf16=state_bf16, drop_attn=drop_attn, fwd_num_warps=fwd_num_warps,
                fwd_num_stages=fwd_num_stages)
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (qg, attn, U, W, kd, last, state0))
    return _ChunkForwardTriton.apply(qg, attn, U, W, kd, last, state0, opts, train)
