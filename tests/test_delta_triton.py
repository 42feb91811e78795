"""``impl: triton`` of the delta rules (methods/linear/delta_triton.py: the chunk loop's forward and backward
kernels) on the CPU through Triton's interpreter: the per-chunk states, the final state and every gradient
(U, W, kd, last, state0) equal the PyTorch loop (gated_delta._ChunkStates), with and without W, with two
V-blocks and with padded shapes; the whole chunked form through the kernels equals the fp32 token loop
(values and gradients); a deliberately broken kernel (the ``W_c S`` term skipped) is caught by the same
comparisons; option errors name the field; without CUDA or the interpreter the case is ``unsupported``.
``dot_precision: bf16``: the kernels equal a PyTorch emulation of their bf16 operand rounding and stay within
the bf16 bound of the fp32 loop (see the section's comment for what the CPU proves and what only the device
gate does). ``outputs: triton`` (the forward kernel writes the chunks' outputs, delta_triton.chunk_forward): outputs,
final state and gradients equal outputs: torch and the fp32 PyTorch path for the three variants (ragged length,
padded tiles, three V-blocks), its bf16 operands equal the emulation, a kernel dropping ``attn_c N_c`` is caught.

Tolerances: fp32 throughout (the kernels compute in fp32, the interpreter's dots are numpy fp32), so the
comparisons with the PyTorch loop hold to rtol 1e-5 / atol 1e-5 (states) and 1e-4 / 1e-5 (gradients: sums in
another order); against the token loop (a different algorithm) the relative norm error is < 1e-4.

As in tests/test_simple_gla_triton.py, TRITON_INTERPRET=1 must be set before triton is first imported, so
unless pytest itself was started with it, the interpreter tests here skip and tests/test_triton_interpreter.py
runs this file in its child pytest (``TRITON_INTERPRET=1 pytest tests/test_delta_triton.py`` runs it alone).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from interpmark import INTERPRETING, interp, sweep_rows  # noqa: E402

from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared  # noqa: E402
from attnbench.methods.linear import gated_delta  # noqa: E402
from attnbench.methods.registry import Unsupported  # noqa: E402

STATE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def _kernels():
    from attnbench.methods.linear import delta_triton

    return delta_triton


def _pieces(B=1, H=2, N=3, C=16, dk=32, dv=32, has_w=True, seed=0):
    """Random loop inputs (fp32, leaf tensors with gradients): U, W (None without), kd, last in (0.5, 1),
    a nonzero state0. Scales keep the state bounded over the chunks."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(B, H, N, C, dv, generator=gen)
    W = 0.1 * torch.randn(B, H, N, C, dk, generator=gen) if has_w else None
    kd = 0.2 * torch.randn(B, H, N, C, dk, generator=gen)
    last = 0.5 + 0.5 * torch.rand(B, H, N, generator=gen)
    state0 = torch.randn(B, H, dk, dv, generator=gen)
    return [None if t is None else t.requires_grad_() for t in (U, W, kd, last, state0)]


def _loop_grads(fn, pieces, upstream):
    """(states, final, grads of the inputs that are not None) of ``fn`` with upstream gradients
    ``upstream`` (on (states, final); None: no gradient flows into that output)."""
    states, final = fn(*pieces)
    outs = [o for o, d in zip((states, final), upstream) if d is not None]
    grads = torch.autograd.grad(outs, [t for t in pieces if t is not None], [d for d in upstream if d is not None])
    return states.detach(), final.detach(), grads


def _upstream(pieces, which, seed=5):
    U, _, kd, _, state0 = pieces
    gen = torch.Generator().manual_seed(seed)
    B, H, N = U.shape[:3]
    d_states = torch.randn(B, H, N, *state0.shape[-2:], generator=gen)
    d_final = torch.randn(state0.shape, generator=gen)
    return {"both": (d_states, d_final), "final": (None, d_final), "states": (d_states, None)}[which]


# ---- the loop: kernels against the PyTorch loop ------------------------------------------------------------
@interp
@pytest.mark.parametrize("has_w", [True, False])
def test_states_equal_the_pytorch_loop(has_w):
    """B=1, H=2, 3 chunks of 16, dk = dv = 32, block_v 16: two V-blocks; a nonzero state0."""
    dt = _kernels()
    pieces = _pieces(has_w=has_w)
    states, final = dt.chunk_states(*pieces, block_v=16)
    want_states, want_final = gated_delta.chunk_states(*pieces)
    assert states.shape == want_states.shape == (1, 2, 3, 32, 32)
    torch.testing.assert_close(states, want_states, **STATE_TOL)
    torch.testing.assert_close(final, want_final, **STATE_TOL)
    assert final.abs().max() > 0.1 and not torch.allclose(final, pieces[4])  # the loop did something


@interp
@pytest.mark.parametrize("has_w,which", [(True, "both"), (False, "both"), (True, "final"), (True, "states")])
def test_gradients_equal_the_pytorch_backward(has_w, which):
    """Gradients of U, W, kd, last and state0 with random upstream gradients on both outputs (or on one only:
    the other is None in the backward)."""
    dt = _kernels()
    pieces = _pieces(has_w=has_w, seed=1)
    upstream = _upstream(pieces, which)
    _, _, got = _loop_grads(functools.partial(dt.chunk_states, block_v=16), pieces, upstream)
    _, _, want = _loop_grads(gated_delta.chunk_states, pieces, upstream)
    assert len(got) == len(want) == (5 if has_w else 4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL)
        assert b.abs().max() > 0  # every gradient is a real one


@interp
def test_padded_shapes_and_partial_gradients():
    """chunk 12, dk 24 (padded in registers to 16, 32), dv 40 with block_v 16 (three V-blocks, the last
    partial), two heads of batch 2; only U and kd ask for gradients (the others are skipped)."""
    dt = _kernels()
    U, W, kd, last, state0 = _pieces(B=2, N=2, C=12, dk=24, dv=40, seed=2)
    W, last, state0 = W.detach(), last.detach(), state0.detach()
    pieces = [U, W, kd, last, state0]
    states, final = dt.chunk_states(*pieces, block_v=16)
    want_states, want_final = gated_delta.chunk_states(*pieces)
    torch.testing.assert_close(states, want_states, **STATE_TOL)
    torch.testing.assert_close(final, want_final, **STATE_TOL)
    upstream = _upstream(pieces, "both")
    got = torch.autograd.grad((states, final), (U, kd), upstream)
    want = torch.autograd.grad((want_states, want_final), (U, kd), upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL)


@interp
def test_negative_control_skipping_w_is_caught():
    """The broken kernel (``W_c S`` skipped in the forward and the backward) fails the comparisons above."""
    dt = _kernels()
    pieces = _pieces(seed=3)
    states, final = dt.chunk_states(*pieces, block_v=16, skip_w=True)
    want_states, want_final = gated_delta.chunk_states(*pieces)
    assert not torch.allclose(final, want_final, **STATE_TOL)
    upstream = _upstream(pieces, "both")
    _, _, got = _loop_grads(functools.partial(dt.chunk_states, block_v=16, skip_w=True), pieces, upstream)
    _, _, want = _loop_grads(gated_delta.chunk_states, pieces, upstream)
    assert not torch.allclose(got[4], want[4], **GRAD_TOL)  # dstate0 misses −Wᵀ dN in every chunk


# ---- dot_precision: bf16 ----------------------------------------------------------------------------------
# What the CPU can prove. Triton's interpreter cannot run bf16 dots (its fp32 -> bf16 cast truncates and its
# tl.dot multiplies bf16 operands as raw uint16 bits), so under the interpreter the kernels round operands by
# hand to nearest even and dot them in fp32 (delta_triton._operand_emulated): products of two bf16 values are
# exact in fp32, so this is the GPU's bf16 MMA with fp32 accumulation up to the order of the fp32 sums.
# (1) The kernels' arithmetic equals a PyTorch emulation that rounds exactly the intended operands (every dot
#     operand, the state among them, rounded to bf16 just before its dot; the state carried, the decay and
#     dlast's ⟨S, dS⟩ in fp32) to fp32 accumulation-order level: BF16_EMULATION_TOL. A kernel that rounded the
#     carried state itself (state_bf16), or did not round at all (the interpreter's tf32 is exact fp32), is
#     ~1e-3 away: caught by a factor of ~100.
# (2) Against the fp32 loop the error is what bf16 rounding gives: u = 2⁻⁸ (8 significant bits), a product of
#     two rounded operands errs by <= 2u + u² relative and fp32 accumulation adds ~1e-7; the errors of
#     independent products partly cancel and the loop (decays <= 1, these W / kd scales) does not amplify them,
#     so the normwise relative error of the states and of every gradient stays below 2u (BF16_TOL = 7.8e-3;
#     measured 1.2e-3 .. 5.1e-3 over seeds, 2-8 chunks, with and without W) and above u / 16 (it does round).
#     A missing term (skip_w) is caught.
# Only the device gate proves the GPU's own conversion (.to(tl.bfloat16), cvt.rn) and bf16 MMA, and the error
# at d = 128, chunk 64, long sequences (CPU emulation, scripts/delta_bf16_check.py: outputs 2e-4 .. 5.1e-3
# relative at 8K against the bf16 gate's 8e-3; gradients not emulated).
BF16_U = 2.0 ** -8
BF16_TOL = 2 * BF16_U
BF16_EMULATION_TOL = 1e-5


def _round_bf16(x):
    return x.bfloat16().float()


def _bf16_emulated_states(U, W, kd, last, state0):
    """The forward of :func:`_bf16_emulated_loop` (no autograd): (states, final state), a ``states_fn``."""
    r = _round_bf16
    with torch.no_grad():
        states = state0.new_empty(*U.shape[:3], *state0.shape[-2:])
        S = state0
        for c in range(U.shape[2]):
            states[:, :, c] = S
            new = U[:, :, c] if W is None else U[:, :, c] - r(W[:, :, c]) @ r(S)
            S = last[:, :, c, None, None] * S + r(kd[:, :, c]).transpose(-1, -2) @ r(new)
    return states, S


def _bf16_emulated_loop(U, W, kd, last, state0, dstates, dfinal):
    """The kernels' bf16 arithmetic in PyTorch (fp32 matmuls of bf16-rounded operands, RNE): (states, final,
    gradients of U, [W,] kd, last, state0) for upstream gradients ``dstates``, ``dfinal`` (either may be None);
    the operands rounded where delta_triton rounds them, nothing else."""
    r = _round_bf16
    U, kd, last, state0 = (t.detach() for t in (U, kd, last, state0))
    W = None if W is None else W.detach()
    n = U.shape[2]
    states, final = _bf16_emulated_states(U, W, kd, last, state0)
    dU, dkd, dlast = torch.empty_like(U), torch.empty_like(kd), torch.empty_like(last)
    dW = None if W is None else torch.empty_like(W)
    dS = torch.zeros_like(state0) if dfinal is None else dfinal.clone()
    for c in reversed(range(n)):
        S_c = states[:, :, c]
        dnew = r(kd[:, :, c]) @ r(dS)
        dU[:, :, c] = dnew
        new = U[:, :, c] if W is None else U[:, :, c] - r(W[:, :, c]) @ r(S_c)
        dkd[:, :, c] = r(new) @ r(dS).transpose(-1, -2)
        dlast[:, :, c] = (S_c * dS).sum((-1, -2))
        before = last[:, :, c, None, None] * dS
        if W is not None:
            dW[:, :, c] = -(r(dnew) @ r(S_c).transpose(-1, -2))
            before = before - r(W[:, :, c]).transpose(-1, -2) @ r(dnew)
        if dstates is not None:
            before = before + dstates[:, :, c]
        dS = before
    return states, final, tuple(t for t in (dU, dW, dkd, dlast, dS) if t is not None)


def _loop_errors(got, want):
    """rel errors of (states, final, every gradient) between two ``_loop_grads``-like triples."""
    return [_rel(got[0], want[0]), _rel(got[1], want[1])] + [_rel(a, b) for a, b in zip(got[2], want[2])]


@interp
@pytest.mark.parametrize("has_w,N", [(True, 3), (False, 3), (True, 8)])
def test_bf16_kernels_round_the_intended_operands(has_w, N):
    """(1): states, final state and gradients equal the PyTorch bf16 emulation; negative controls: the carried
    state rounded (state_bf16) and no rounding at all (tf32, exact fp32 in the interpreter) are caught."""
    dt = _kernels()
    pieces = _pieces(has_w=has_w, N=N, seed=4)
    upstream = _upstream(pieces, "both")
    want = _bf16_emulated_loop(*pieces, *upstream)

    def run(**opts):
        return _loop_grads(functools.partial(dt.chunk_states, block_v=16, **opts), pieces, upstream)

    errors = _loop_errors(run(dot_precision="bf16"), want)
    assert len(errors) == (7 if has_w else 6)
    assert max(errors) < BF16_EMULATION_TOL, errors
    for broken in (dict(dot_precision="bf16", state_bf16=True), dict(dot_precision="tf32")):
        errors = _loop_errors(run(**broken), want)
        assert max(errors[:2]) > 50 * BF16_EMULATION_TOL, (broken, errors)


@interp
def test_bf16_padded_shapes_equal_the_emulation():
    """chunk 12, dk 24, dv 40 (padded tiles, three V-blocks): padding rows round to 0 and write nothing."""
    dt = _kernels()
    pieces = _pieces(B=2, N=2, C=12, dk=24, dv=40, seed=2)
    upstream = _upstream(pieces, "both")
    got = _loop_grads(functools.partial(dt.chunk_states, block_v=16, dot_precision="bf16"), pieces, upstream)
    assert max(_loop_errors(got, _bf16_emulated_loop(*pieces, *upstream))) < BF16_EMULATION_TOL


@interp
@pytest.mark.parametrize("has_w", [True, False])
def test_bf16_kernels_agree_with_the_fp32_loop_within_the_bf16_bound(has_w):
    """(2): states, final and every gradient within BF16_TOL of the fp32 PyTorch loop, and not closer than
    u / 16 (the option reached the kernels); negative control: skip_w with bf16 is caught."""
    dt = _kernels()
    pieces = _pieces(has_w=has_w, N=4, seed=6)
    upstream = _upstream(pieces, "both")
    want = _loop_grads(gated_delta.chunk_states, pieces, upstream)
    got = _loop_grads(functools.partial(dt.chunk_states, block_v=16, dot_precision="bf16"), pieces, upstream)
    errors = _loop_errors(got, want)
    assert max(errors) < BF16_TOL, errors
    assert min(errors[:2]) > BF16_U / 16, errors
    if has_w:
        broken = _loop_grads(functools.partial(dt.chunk_states, block_v=16, dot_precision="bf16", skip_w=True),
                             pieces, upstream)
        assert max(_loop_errors(broken, want)) > 10 * BF16_TOL


def test_chunk_outputs_bf16_rounds_the_operands():
    """``chunk_outputs(..., bf16=True)``: bf16 operands, the result within 2u (normwise) of fp32 and equal to
    the fp32 matmuls of the rounded operands up to the bf16 rounding of each product's sum (< u);
    gradients flow in fp32."""
    gen = torch.Generator().manual_seed(7)
    qg, attn = torch.randn(1, 2, 3, 16, 32, generator=gen), torch.randn(1, 2, 3, 16, 16, generator=gen).tril()
    U, W = torch.randn(1, 2, 3, 16, 32, generator=gen), 0.1 * torch.randn(1, 2, 3, 16, 32, generator=gen)
    states = torch.randn(1, 2, 3, 32, 32, generator=gen).requires_grad_()
    exact = gated_delta.chunk_outputs(qg, attn, U, W, states)
    got = gated_delta.chunk_outputs(qg, attn, U, W, states, bf16=True)
    assert got.dtype == torch.float32
    r = _round_bf16
    rounded = r(qg) @ r(states) + r(attn) @ r(U - r(W) @ r(states))
    assert _rel(got, rounded) < BF16_U
    assert BF16_U / 16 < _rel(got, exact) < BF16_TOL
    (grad,) = torch.autograd.grad(got.sum(), states)
    (want,) = torch.autograd.grad(exact.sum(), states)
    assert grad.dtype == torch.float32 and _rel(grad, want) < BF16_TOL


# ---- the chunked form through the kernels, against the token loop -----------------------------------------
def _inputs(length=37, heads=2, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen).requires_grad_() for _ in range(3))
    g = F.logsigmoid(torch.randn(1, heads, length, generator=gen) + 2.0).requires_grad_()  # mild decays
    beta = torch.rand(1, heads, length, generator=gen).requires_grad_()
    return [q, k, v, g, beta]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _errors(name, states_fn, segment=0, bf16_outputs=False):
    """rel errors of (out, dq, dk, dv, dg, dbeta) of the chunked form (chunk 16, 37 tokens: three chunks, the
    last padded) with ``states_fn`` against the fp32 token loop."""
    gated, delta, normalize = gated_delta.VARIANTS[name]
    kw = dict(gated=gated, delta=delta, normalize=normalize)
    inputs = _inputs()
    out = gated_delta.chunked(*inputs, chunk=16, states_fn=states_fn, segment=segment, bf16_outputs=bf16_outputs,
                              **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    used = inputs if delta else inputs[:4]  # simple_gla does not read beta
    got = torch.autograd.grad(out, used, dout)
    ref = gated_delta.naive_recurrence(*inputs, **kw)
    want = torch.autograd.grad(ref, used, dout)
    return [_rel(out, ref)] + [_rel(a, b) for a, b in zip(got, want)]


TOKEN_LOOP_TOL = 1e-4  # relative norm error, values and every gradient


@interp
@pytest.mark.parametrize("name,segment", [("gated_delta_rule", 0), ("gated_delta_rule", 20), ("simple_gla", 0)])
def test_chunked_through_the_kernels_equals_the_token_loop(name, segment):
    """Values and gradients of q, k, v, g, beta (simple_gla: beta unused, g); segment 20: the kernels in
    every segment, the state carried across (checkpointed)."""
    dt = _kernels()
    errors = _errors(name, functools.partial(dt.chunk_states, block_v=16), segment=segment)
    assert len(errors) == (6 if gated_delta.VARIANTS[name][1] else 5)
    assert max(errors) < TOKEN_LOOP_TOL, errors


@interp
def test_chunked_negative_control_is_caught():
    """The broken kernel fails the same comparison with the token loop (values and gradients)."""
    dt = _kernels()
    errors = _errors("gated_delta_rule", functools.partial(dt.chunk_states, block_v=16, skip_w=True))
    assert errors[0] > 10 * TOKEN_LOOP_TOL and min(errors) > TOKEN_LOOP_TOL, errors


@interp
@pytest.mark.parametrize("name,segment", [("gated_delta_rule", 0), ("gated_delta_rule", 20), ("simple_gla", 0)])
def test_chunked_with_bf16_dots_within_the_bf16_bound(name, segment):
    """The chunked form with dot_precision bf16 (the loop's kernels and chunk_outputs): values and every
    gradient within BF16_TOL of the fp32 token loop (measured 2.3e-3 .. 3.1e-3) and not closer than u / 16.
    That bound alone is not a fault detector at this size: the W_c S term skipped errs by only ~4e-3 here
    (37 tokens, three chunks). What catches it is (1) at the method level: the values equal the chunked form
    with the PyTorch bf16 emulation as its loop to BF16_EMULATION_TOL, and skip_w is ~4e-3 from it."""
    dt = _kernels()
    states_fn = functools.partial(dt.chunk_states, block_v=16, dot_precision="bf16")
    errors = _errors(name, states_fn, segment=segment, bf16_outputs=True)
    assert BF16_U / 16 < min(errors) and max(errors) < BF16_TOL, errors
    if segment:
        return
    gated, delta, normalize = gated_delta.VARIANTS[name]
    inputs = [t.detach() for t in _inputs()]

    def run(fn):
        return gated_delta.chunked(*inputs, chunk=16, states_fn=fn, bf16_outputs=True, gated=gated, delta=delta,
                                   normalize=normalize)

    emulated = run(_bf16_emulated_states)
    assert _rel(run(states_fn), emulated) < BF16_EMULATION_TOL
    if delta:
        assert _rel(run(functools.partial(states_fn, skip_w=True)), emulated) > 100 * BF16_EMULATION_TOL


# ---- outputs: triton (the forward kernel writes every chunk's outputs, delta_triton.chunk_forward) ---------
def _with_outputs(**opts):
    """A ``states_fn`` as states_impl builds it for ``outputs: triton`` (block_v 16: several V-blocks)."""
    dt = _kernels()
    fn = functools.partial(dt.chunk_states, block_v=16, **{k: v for k, v in opts.items() if k != "drop_attn"})
    fn.outputs_fn = functools.partial(dt.chunk_forward, block_v=16, **opts)
    return fn


def _outputs_case(name, states_fn, length=37, dk=24, dv=40, seed=0):
    """(out, final, grads of q, k, v, [g,] [beta,] state0) of the chunked form (chunk 16: 37 tokens are three
    chunks, the last padded; dk 24 and dv 40 padded in registers, dv over three V-blocks of 16, the last
    partial) from a nonzero state0, with random upstream gradients on the outputs and the final state."""
    gated, delta, normalize = gated_delta.VARIANTS[name]
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, length, dk, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, length, dv, generator=gen).requires_grad_()
    g = F.logsigmoid(torch.randn(1, 2, length, generator=gen) + 2.0).requires_grad_()
    beta = torch.rand(1, 2, length, generator=gen).requires_grad_()
    state0 = (0.3 * torch.randn(1, 2, dk, dv, generator=gen)).requires_grad_()
    out, final = gated_delta.chunked(q, k, v, g, beta, chunk=16, state0=state0, return_state=True,
                                     states_fn=states_fn, gated=gated, delta=delta, normalize=normalize)
    used = [q, k, v] + ([g] if gated else []) + ([beta] if delta else []) + [state0]
    dout = torch.randn(out.shape, generator=gen)
    dfinal = torch.randn(final.shape, generator=gen)
    return out, final, torch.autograd.grad((out, final), used, (dout, dfinal))


@interp
@pytest.mark.parametrize("name", list(gated_delta.VARIANTS))
def test_outputs_triton_equal_outputs_torch(name, monkeypatch):
    """outputs: triton against outputs: torch (the same loop kernel, then chunk_outputs in PyTorch) and against
    the fp32 PyTorch path: the outputs, the final state and the gradients of q, k, v, g, beta and state0
    (ragged length, padded dk and dv, three V-blocks). The forward does not call chunk_outputs."""
    calls = []
    real = gated_delta.chunk_outputs
    monkeypatch.setattr(gated_delta, "chunk_outputs", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    dt = _kernels()
    got = _outputs_case(name, _with_outputs())
    want = _outputs_case(name, functools.partial(dt.chunk_states, block_v=16))
    fp32 = _outputs_case(name, None)
    assert len(calls) == 3  # once each: in this path's backward (recomputed there), in the others' forwards
    assert len(got[2]) == len(want[2]) == {"gated_delta_rule": 6, "delta_rule": 5, "simple_gla": 5}[name]
    for other in (want, fp32):
        torch.testing.assert_close(got[0], other[0], **STATE_TOL)
        torch.testing.assert_close(got[1], other[1], **STATE_TOL)
        for a, b in zip(got[2], other[2]):
            torch.testing.assert_close(a, b, **GRAD_TOL)
            assert b.abs().max() > 0
    with torch.no_grad():  # forward only: the states are not stored (no backward needs them)
        out, final = gated_delta.chunked(*(t.detach() for t in _inputs(dim=24)), chunk=16, return_state=True,
                                         states_fn=_with_outputs(), **dict(zip(("gated", "delta", "normalize"),
                                                                                gated_delta.VARIANTS[name])))
    assert len(calls) == 3  # no backward, and the forward does not call it
    assert out.shape == (1, 2, 37, 24) and final.abs().max() > 0


@interp
def test_outputs_triton_forward_only_skips_the_states_and_the_negative_control_is_caught():
    """states_forward with qg and attn: the outputs equal chunk_outputs of its states, with and without the
    states stored (store_states=False returns None); the broken kernel (drop_attn: attn_c N_c dropped) is caught,
    by the comparison at the kernel and at the chunked form's outputs."""
    dt = _kernels()
    U, W, kd, last, state0 = (None if t is None else t.detach() for t in _pieces(N=3, C=12, dk=24, dv=40, seed=8))
    gen = torch.Generator().manual_seed(8)
    qg = torch.randn(1, 2, 3, 12, 24, generator=gen)
    attn = torch.randn(1, 2, 3, 12, 12, generator=gen).tril()
    states, final, out = dt.states_forward(U, W, kd, last, state0, qg=qg, attn=attn, block_v=16)
    want = gated_delta.chunk_outputs(qg, attn, U, W, states)
    torch.testing.assert_close(out, want, **STATE_TOL)
    none, final2, out2 = dt.states_forward(U, W, kd, last, state0, qg=qg, attn=attn, block_v=16, store_states=False)
    assert none is None
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(final2, final, rtol=0, atol=0)
    _, _, broken = dt.states_forward(U, W, kd, last, state0, qg=qg, attn=attn, block_v=16, drop_attn=True)
    assert _rel(broken, want) > 0.1
    got = _outputs_case("gated_delta_rule", _with_outputs(drop_attn=True))
    right = _outputs_case("gated_delta_rule", None)
    assert _rel(got[0], right[0]) > 1e-2  # the final state is right: only the outputs miss the term
    torch.testing.assert_close(got[1], right[1], **STATE_TOL)


@interp
@pytest.mark.parametrize("has_w", [True, False])
def test_outputs_triton_bf16_rounds_the_intended_operands(has_w):
    """dot_precision bf16 with the outputs in the kernel: equal to the PyTorch emulation (the states of
    _bf16_emulated_states; outputs r(qg) r(S) + r(attn) r(U − r(W) r(S)), the sum in fp32), within 2u of fp32;
    negative control: the tf32 kernel (exact fp32 in the interpreter) is far from the emulation."""
    dt = _kernels()
    r = _round_bf16
    U, W, kd, last, state0 = (None if t is None else t.detach() for t in _pieces(N=4, has_w=has_w, seed=4))
    gen = torch.Generator().manual_seed(4)
    qg = torch.randn(1, 2, 4, 16, 32, generator=gen)
    attn = torch.randn(1, 2, 4, 16, 16, generator=gen).tril()
    states, _ = _bf16_emulated_states(U, W, kd, last, state0)
    new = U if W is None else U - r(W) @ r(states)
    emulated = r(qg) @ r(states) + r(attn) @ r(new)
    _, _, out = dt.states_forward(U, W, kd, last, state0, qg=qg, attn=attn, block_v=16, dot_precision="bf16")
    assert _rel(out, emulated) < BF16_EMULATION_TOL
    exact = gated_delta.chunk_outputs(qg, attn, U, W, gated_delta.chunk_states(U, W, kd, last, state0)[0])
    assert BF16_U / 16 < _rel(out, exact) < BF16_TOL
    _, _, tf32 = dt.states_forward(U, W, kd, last, state0, qg=qg, attn=attn, block_v=16)
    assert _rel(tf32, emulated) > 50 * BF16_EMULATION_TOL


# ---- the method ------------------------------------------------------------------------------------------
def _ctx(method="gated_delta_rule", params=None, head_dim=16, seq=20, device="cpu"):
    from attnbench import masks

    spec = masks.make_mask("causal")
    bound = spec.bind(seq, seq)
    case = SimpleNamespace(method=method, batch=1, heads_q=2, heads_kv=2, seq_q=seq, seq_kv=seq,
                           head_dim=head_dim, seed=0, dtype="float32", mode="fwd")
    return BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device(device),
                        dtype=torch.float32, options={}, params=dict(params or {}))


@interp
@pytest.mark.parametrize("method", list(gated_delta.VARIANTS))
def test_method_with_impl_triton_equals_its_reference(method, monkeypatch):
    """The built method (impl: triton) against its own reference (the token loop) and against impl: torch;
    the timed form and the decode prefill run through the kernels (counted), the reference does not."""
    dt = _kernels()
    calls = []
    forward = dt.states_forward
    monkeypatch.setattr(dt, "states_forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    params = {"chunk": 16, "impl": "triton", "block_v": 16}
    fast = as_prepared(METHODS[method].build(_ctx(method, params)))
    plain = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16})))
    gated, delta, _ = gated_delta.VARIANTS[method]
    inputs = [t.detach() for t in _inputs(length=20, dim=16)]
    args = inputs[:3] + ([inputs[3]] if gated else []) + ([inputs[4]] if delta else [])
    names = ["q", "k", "v"] + (["g"] if gated else []) + (["beta"] if delta else [])
    extras = dict(zip(names[3:], args[3:]))
    assert set(fast.extras) == set(extras)
    out = fast.fn(*args[:3], **extras)
    assert len(calls) == 1
    assert _rel(out, fast.reference(*args[:3], **extras)) < 1e-4
    assert _rel(out, plain.fn(*args[:3], **extras)) < 1e-5
    assert len(calls) == 1  # neither the reference nor impl torch ran the kernels
    state = fast.decode.prefill(*args[:3], **extras)
    assert len(calls) == 2
    torch.testing.assert_close(state, plain.decode.prefill(*args[:3], **extras), **STATE_TOL)


@interp
@pytest.mark.parametrize("method", list(gated_delta.VARIANTS))
def test_method_with_dot_precision_bf16(method, monkeypatch):
    """``method_options.<method>.dot_precision: bf16`` (impl: triton) reaches the kernels (bf16 passed) and
    chunk_outputs (bf16=True): the output within BF16_TOL of its reference and of impl torch, and not equal to
    the tf32 build's (which the interpreter runs as exact fp32)."""
    dt = _kernels()
    seen = []
    forward = dt.states_forward
    monkeypatch.setattr(dt, "states_forward",
                        lambda *a, **kw: seen.append(kw["dot_precision"]) or forward(*a, **kw))
    outputs = []
    real_outputs = gated_delta.chunk_outputs
    monkeypatch.setattr(gated_delta, "chunk_outputs",
                        lambda *a, **kw: outputs.append(kw.get("bf16", False)) or real_outputs(*a, **kw))
    base = {"chunk": 16, "impl": "triton", "block_v": 16}
    fast = as_prepared(METHODS[method].build(_ctx(method, {**base, "dot_precision": "bf16"})))
    tf32 = as_prepared(METHODS[method].build(_ctx(method, base)))
    gated, delta, _ = gated_delta.VARIANTS[method]
    q, k, v, g, beta = (t.detach() for t in _inputs(length=40, dim=16))
    extras = {name: t for name, t, used in (("g", g, gated), ("beta", beta, delta)) if used}
    out = fast.fn(q, k, v, **extras)
    assert seen == ["bf16"] and outputs == [True]
    other = tf32.fn(q, k, v, **extras)
    assert seen == ["bf16", "tf32"] and outputs == [True, False]
    ref = fast.reference(q, k, v, **extras)
    assert BF16_U / 16 < _rel(out, ref) < BF16_TOL
    assert BF16_U / 16 < _rel(out, other) < BF16_TOL


@interp
@pytest.mark.parametrize("method", ["gated_delta_rule", "simple_gla"])
def test_method_with_outputs_triton(method, monkeypatch):
    """``method_options.<method>.outputs: triton`` (impl: triton): the built method's forward takes its outputs
    from the kernel (chunk_outputs not called, chunk_forward called once) and equals impl torch; the forward
    launch gets OUTPUT_DEFAULTS unless num_warps / num_stages are given."""
    dt = _kernels()
    calls = []
    real = gated_delta.chunk_outputs
    monkeypatch.setattr(gated_delta, "chunk_outputs", lambda *a, **kw: calls.append("torch") or real(*a, **kw))
    forward = dt.chunk_forward
    monkeypatch.setattr(dt, "chunk_forward", lambda *a, **kw: calls.append(kw) or forward(*a, **kw))
    base = {"chunk": 16, "impl": "triton", "block_v": 16}
    fast = as_prepared(METHODS[method].build(_ctx(method, {**base, "outputs": "triton"})))
    plain = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16})))
    gated, delta, _ = gated_delta.VARIANTS[method]
    q, k, v, g, beta = (t.detach() for t in _inputs(length=20, dim=16))
    extras = {name: t for name, t, used in (("g", g, gated), ("beta", beta, delta)) if used}
    out = fast.fn(q, k, v, **extras)
    assert len(calls) == 1 and calls[0]["fwd_num_warps"] == dt.OUTPUT_DEFAULTS["num_warps"], calls
    assert calls[0]["fwd_num_stages"] == dt.OUTPUT_DEFAULTS["num_stages"] and calls[0]["num_warps"] == 4
    assert _rel(out, plain.fn(q, k, v, **extras)) < 1e-5
    assert calls[1:] == ["torch"]  # impl torch computes its outputs in PyTorch
    given = {**base, "outputs": "triton", "num_warps": 2, "num_stages": 2}
    fn = gated_delta.states_impl(_ctx(method, given), 16)
    assert fn.outputs_fn.keywords["fwd_num_warps"] == 2 and fn.outputs_fn.keywords["fwd_num_stages"] == 2
    assert not hasattr(gated_delta.states_impl(_ctx(method, base), 16), "outputs_fn")  # the default: torch


@interp
@pytest.mark.parametrize("outputs", ["torch", "triton"])
def test_state_scan_summary_through_the_kernels(outputs):
    """The CP state scan's summary (the affine map M, b: the chunk loop on an identity state0, stride-0 expanded,
    with dk-wide zero values) equals impl torch's; with outputs: triton too (the kernel that writes outputs)."""
    method = "gated_delta_rule"
    params = {"chunk": 16, "impl": "triton", "block_v": 16, "outputs": outputs}
    fast = as_prepared(METHODS[method].build(_ctx(method, params)))
    plain = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16})))
    q, k, v, g, beta = (t.detach() for t in _inputs(length=20, dim=16))
    got = fast.state_scan.summary(q, k, v, None, g=g, beta=beta)
    want = plain.state_scan.summary(q, k, v, None, g=g, beta=beta)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **STATE_TOL)


@interp
def test_harness_rows(cfg):
    """Through the case runner (the gate, gradients included): fp32 fwd_bwd with impl: triton is ok."""
    method = "gated_delta_rule"
    cfg.update(methods=[method], masks=["causal"], seq_lens=[20], modes=["fwd_bwd"], head_dim=16,
               method_options={method: {"chunk": 16, "impl": "triton", "block_v": 16}})
    frame = sweep_rows(cfg)
    assert len(frame) == 1
    assert frame.loc[0, "status"] == "ok", frame.loc[0, "reason"]


@pytest.mark.parametrize("params,field", [
    ({"impl": "cuda"}, "impl"),
    ({"impl": "triton", "block_v": 8}, "block_v"),
    ({"impl": "triton", "block_v": 256}, "block_v"),
    ({"impl": "triton", "block_v": 48}, "block_v"),
    ({"impl": "triton", "num_warps": 3}, "num_warps"),
    ({"impl": "triton", "dot_precision": "fp16"}, "dot_precision"),
    ({"impl": "triton", "num_stages": 4}, "num_stages"),
    ({"impl": "triton", "num_stages": True}, "num_stages"),  # a bool is not the stage count 1
    ({"impl": "triton", "chunk": 512}, "chunk"),
    ({"block_v": 32}, "block_v"),  # a Triton-only option with impl torch
    ({"impl": "torch", "num_warps": 4}, "num_warps"),
    ({"impl": "torch", "num_stages": 2}, "num_stages"),
    ({"impl": "torch", "dot_precision": "bf16"}, "dot_precision"),
    ({"impl": "triton", "dot_precision": "bfloat16"}, "dot_precision"),
    ({"impl": "triton", "outputs": "cuda"}, "outputs"),
    ({"impl": "triton", "outputs": True}, "outputs"),
    ({"outputs": "triton"}, "outputs"),  # the outputs are the Triton loop kernel's: impl torch has none
    ({"impl": "torch", "outputs": "torch"}, "outputs"),
])
@pytest.mark.parametrize("method", ["gated_delta_rule", "simple_gla"])
def test_bad_options_name_the_field(method, params, field):
    with pytest.raises(ValueError, match=f"method_options.{method}.{field}"):
        METHODS[method].build(_ctx(method, params))


@pytest.mark.parametrize("method", list(gated_delta.VARIANTS))
def test_without_cuda_or_interpreter_the_case_is_unsupported(method, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(Unsupported, match="impl=triton.*TRITON_INTERPRET=1"):
        METHODS[method].build(_ctx(method, {"impl": "triton"}))
    METHODS[method].build(_ctx(method, {"impl": "torch"}))  # the control: impl torch builds on the CPU


def test_head_dims_above_256_are_unsupported():
    with pytest.raises(Unsupported, match="head_dim 512 > 256"):
        METHODS["delta_rule"].build(_ctx("delta_rule", {"impl": "triton"}, head_dim=512))


@interp
def test_lamamba_streamed_through_the_triton_loop_equals_the_whole_layer():
    """LaMamba's streamed form (``stream``: pieces of 16 of 40 tokens) with impl: triton: the carried state enters
    each piece's kernel as its state0 and its gradient leaves as dstate0; output, input and parameter gradients
    equal the whole layer's (the torch-side negative controls: tests/test_lamamba_stream.py)."""
    def build(stream):
        return as_prepared(METHODS["lamamba"].build(_ctx("lamamba", {"window": 8, "state_size": 8, "chunk": 8,
                                                                     "impl": "triton", "block_v": 16,
                                                                     "stream": stream}, seq=40, head_dim=16)))

    whole, streamed = build(0), build(16)
    x = torch.randn(1, 40, 2 * 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y0, y1 = whole.fn(x), streamed.fn(x)
    assert _rel(y1, y0) < 1e-4
    g0 = torch.autograd.grad(y0.square().sum(), [x, *whole.parameters], allow_unused=True)
    g1 = torch.autograd.grad(y1.square().sum(), [x, *streamed.parameters], allow_unused=True)
    for a, b in zip(g1, g0):
        if b is not None and b.abs().max() > 0:
            assert _rel(a, b) < 1e-3


@interp
def test_lamamba_scan_through_the_triton_loop_equals_the_torch_loop(monkeypatch):
    """LaMamba's SSD branch (state 8, head dim 16: dk != dv) with impl: triton: the layer's output and its input
    gradient equal impl: torch; negative control: a broken carry (each chunk from a zero state) is caught."""
    from attnbench.methods import METHODS, as_prepared

    def build(params):
        return as_prepared(METHODS["lamamba"].build(_ctx("lamamba", {"window": 8, "state_size": 8, "chunk": 8,
                                                                     **params}, seq=40, head_dim=16)))

    x = torch.randn(1, 40, 2 * 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    plain, fast = build({}), build({"impl": "triton", "block_v": 16})
    y0, y1 = plain.fn(x), fast.fn(x)
    assert _rel(y1, y0) < 1e-4
    (g0,), (g1,) = (torch.autograd.grad(y.square().sum(), x) for y in (y0, y1))
    assert _rel(g1, g0) < 1e-3
    from attnbench.methods.linear import delta_triton

    real = delta_triton.chunk_states

    def no_carry(*args, **kwargs):  # the states entering the chunks dropped: each chunk starts from zero
        states, final = real(*args, **kwargs)
        return torch.zeros_like(states), final

    monkeypatch.setattr(delta_triton, "chunk_states", no_carry)
    assert _rel(build({"impl": "triton", "block_v": 16}).fn(x), y0) > 1e-2


@pytest.mark.parametrize("method", list(gated_delta.VARIANTS))
def test_auto_defaults_take_the_measured_kernels_on_cuda_and_pytorch_elsewhere(method, monkeypatch):
    """The defaults (impl, solve, wy_precision: auto) resolve, and fn.resolved (recorded in the row's
    resolved_options) says so: on the CPU the PyTorch paths (even where the interpreter could run the kernels);
    on a CUDA device where the kernels run the chunk loop's kernels, for the delta rules the fused WY kernel
    (C <= 64) with one tf32 product for bf16 inputs (measured faster on the H200, results/linear-summary.md).
    Control: an explicit option wins over auto."""
    from attnbench.methods.linear import linear_attn

    _, delta, _ = gated_delta.VARIANTS[method]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    build = lambda params=None, **kw: METHODS[method].build(_ctx(method, params, **kw)).fn.resolved  # noqa: E731
    assert build() == {"impl": "torch", "solve": "torch"}
    monkeypatch.setattr(linear_attn, "triton_runnable", lambda device: "")
    fused = {"solve": "fused", "wy_precision": "tf32x3"} if delta else {"solve": "torch"}
    assert build(device="cuda") == {"impl": "triton", **fused}  # fp32 inputs: fp32-like dots
    ctx = _ctx(method, None, device="cuda")
    ctx = BuildContext(**{**ctx.__dict__, "dtype": torch.bfloat16})
    assert METHODS[method].build(ctx).fn.resolved == {"impl": "triton", **({**fused, "wy_precision": "tf32"}
                                                                           if delta else fused)}
    assert build({"chunk": 128}, device="cuda")["solve"] == "torch"  # the fused kernel only where measured
    explicit = {"impl": "torch", **({"solve": "torch"} if delta else {})}
    assert build(explicit, device="cuda") == {"impl": "torch", "solve": "torch"}
    monkeypatch.setattr(linear_attn, "triton_runnable", lambda device: "no kernels here")
    assert build(device="cuda") == {"impl": "torch", "solve": "torch"}


def test_a_row_records_what_the_auto_defaults_resolved_to():
    """The harness writes the method's fn.resolved into the row (resolved_options, JSON with sorted keys): on the
    CPU the delta rule's defaults ran PyTorch; a method that reports nothing leaves the column empty."""
    from attnbench import masks
    from attnbench.config.plan import Case
    from attnbench.execute.case import CaseRunner

    spec = masks.make_mask("causal")
    options = {"timing": {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False},
               "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32}
    rows = {}
    for method in ("delta_rule", "reference"):
        case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=64,
                    seq_kv=64, head_dim=16, dtype="float32", mode="fwd", seed=0)
        rows[method] = CaseRunner("cpu", options).run(case)
        assert rows[method]["status"] == "ok", rows[method]["reason"]
    assert rows["delta_rule"]["resolved_options"] == '{"impl": "torch", "solve": "torch"}'
    assert rows["reference"].get("resolved_options") is None
