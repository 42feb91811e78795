"""``solve: triton`` of the delta rules (methods/linear/tril_triton.py: ``(I + A)⁻¹`` of each chunk's strictly
lower A by forward substitution in a Triton kernel, then ``T @ rhs``) on the CPU through Triton's interpreter:
the kernel's T against ``torch.linalg.inv`` (fp64) at C = 16, 64 and a padded 12, ``T (I + A) = I``, the upper
triangle of A in memory ignored, strided inputs; the gradients through the autograd Function (unmasked
``−Tᵀ dT Tᵀ``) against autograd through ``torch.linalg.solve_triangular`` when A is built as chunk_pieces builds
it; the chunked delta rules (values and gradients, padded, segmented) with ``solve=triton`` equal to
``solve=torch``; the built methods (timed form, decode prefill, state scan) and a harness row; negative
controls (a kernel that skips one substitution step, a backward with the wrong sign) caught by the same
comparisons; option errors name the field; without CUDA or the interpreter the case is ``unsupported``.

Inputs: A = β_r (k_r·k_i) e^(γ_r−γ_i) for i < r with β in (0, 1), unit keys and mild decays: the sizes the
method produces. Tolerances: fp32 throughout (the interpreter's arithmetic is numpy fp32); T against the fp64
inverse to 1e-5 absolute (entries of T are O(1)); gradients rtol 1e-4 / atol 1e-5 (the same sums in another
order); the chunked form's relative norm error between the two solves < 1e-5.

As in tests/test_delta_triton.py, TRITON_INTERPRET=1 must be set before triton is first imported, so unless
pytest itself was started with it, the interpreter tests here skip and tests/test_triton_interpreter.py runs
this file in its child pytest (``TRITON_INTERPRET=1 pytest tests/test_tril_triton.py`` runs it alone).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from interpmark import INTERPRETING, interp, sweep_rows  # noqa: E402

from attnbench.methods import METHODS, as_prepared  # noqa: E402
from attnbench.methods.linear import gated_delta  # noqa: E402
from attnbench.methods.registry import Unsupported  # noqa: E402

GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def _tril():
    from attnbench.methods.linear import tril_triton

    return tril_triton


def _leaves(shape=(1, 3), C=16, dk=32, seed=0):
    """(k, beta, gam): unit keys [..., C, dk], β in (0, 1), cumulative log-decays γ (mild gates)."""
    gen = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(*shape, C, dk, generator=gen), dim=-1)
    beta = torch.rand(*shape, C, generator=gen)
    gam = F.logsigmoid(torch.randn(*shape, C, generator=gen) + 3.0).cumsum(-1)
    return k, beta, gam


def _build(k, beta, gam):
    """A = β_r (k_r·k_i) e^(γ_r−γ_i) for i < r, exactly 0 on and above the diagonal, built as chunk_pieces
    builds it (the decay over i <= r with exp(−inf) above, the diagonal masked after)."""
    C = k.shape[-2]
    incl = torch.ones(C, C, dtype=torch.bool).tril()
    decay = torch.exp((gam[..., :, None] - gam[..., None, :]).masked_fill(~incl, float("-inf")))
    strict = decay.masked_fill(torch.eye(C, dtype=torch.bool), 0.0)
    return beta[..., :, None] * (k @ k.transpose(-1, -2)) * strict


def _below(**kw):
    return _build(*_leaves(**kw))


# ---- the kernel --------------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("C", [16, 64, 12])
def test_inverse_equals_linalg_inv(C):
    """T against the fp64 inverse, T (I + A) = I, T unit lower-triangular; what lies on and above A's diagonal
    in memory is not read (the same T with random values there). C = 12: padded in registers to 16."""
    A = _below(C=C)
    T = _tril().tril_inverse(A)
    eye = torch.eye(C)
    want = torch.linalg.inv((eye + A).double()).float()
    assert T.shape == A.shape and T.is_contiguous()
    torch.testing.assert_close(T, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(T @ (eye + A), eye.expand_as(A), rtol=0, atol=1e-5)
    assert torch.equal(T.triu(1), torch.zeros_like(T))
    assert torch.equal(T.diagonal(dim1=-2, dim2=-1), torch.ones(T.shape[:-1]))
    below = torch.ones(C, C, dtype=torch.bool).tril(-1)
    assert (T[..., below].abs() > 1e-3).float().mean() > 0.5  # a real inverse, not the identity
    noise = torch.randn(A.shape, generator=torch.Generator().manual_seed(7)).triu()
    torch.testing.assert_close(_tril().tril_inverse(A + noise), T, rtol=0, atol=0)


@interp
def test_strided_inputs():
    """A transposed view (its last two strides swapped) and non-contiguous leading dims give the same T."""
    A = _below(shape=(3, 2), C=16)
    T = _tril().tril_inverse(A)
    upper = A.transpose(-1, -2).contiguous().transpose(-1, -2)  # the same values, column-major
    assert upper.stride()[-2:] == (1, 16)
    torch.testing.assert_close(_tril().tril_inverse(upper), T, rtol=0, atol=0)
    swapped = A.transpose(0, 1)  # [2, 3, C, C] view: the leading dims are flattened with a copy
    torch.testing.assert_close(_tril().tril_inverse(swapped), T.transpose(0, 1), rtol=0, atol=0)


def _solve_torch(A, rhs):
    eye = torch.eye(A.shape[-1])
    return torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)


def _solve_kernel(A, rhs, inverse=None):
    return (inverse or _tril().tril_inverse)(A) @ rhs


def _grads(solve, C, seed=1):
    """Gradients of a random linear functional of ``solve(A, rhs)`` in k, β, γ and rhs (A built from them as
    in chunk_pieces: the unmasked upper part of the kernel's dA meets zeros there), and the strictly lower part
    of dA itself."""
    k, beta, gam = (t.requires_grad_() for t in _leaves(C=C, seed=seed))
    gen = torch.Generator().manual_seed(seed + 10)
    rhs = torch.randn(*beta.shape, 24, generator=gen).requires_grad_()
    weight = torch.randn(rhs.shape, generator=gen)
    A = _build(k, beta, gam)
    A.retain_grad()
    (solve(A, rhs) * weight).sum().backward()
    return k.grad, beta.grad, gam.grad, rhs.grad, A.grad.tril(-1)


@interp
@pytest.mark.parametrize("C", [16, 64])
def test_gradients_equal_solve_triangular(C):
    got = _grads(_solve_kernel, C)
    want = _grads(_solve_torch, C)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL)
        assert b.abs().max() > 1e-3  # a real gradient


class _WrongSign(torch.autograd.Function):
    """The negative control of the backward: T by the kernel, dA = +Tᵀ dT Tᵀ (the sign flipped)."""

    @staticmethod
    def forward(ctx, A):
        T = _tril().inverse_forward(A)
        ctx.save_for_backward(T)
        return T

    @staticmethod
    def backward(ctx, dT):
        (T,) = ctx.saved_tensors
        return T.transpose(-1, -2) @ dT @ T.transpose(-1, -2)


@interp
def test_negative_controls_are_caught():
    """A kernel that skips substitution step 5 fails the inverse check and the gradient comparison; a backward
    with the wrong sign fails the gradient comparison (its forward is right)."""
    tt = _tril()
    A = _below(C=16)
    eye = torch.eye(16)
    broken = tt.tril_inverse(A, skip_step=5)
    assert not torch.allclose(broken @ (eye + A), eye.expand_as(A), rtol=0, atol=1e-5)
    want = _grads(_solve_torch, 16)
    skipped = _grads(functools.partial(_solve_kernel, inverse=functools.partial(tt.tril_inverse, skip_step=5)), 16)
    assert not torch.allclose(skipped[0], want[0], **GRAD_TOL)
    flipped = _grads(functools.partial(_solve_kernel, inverse=_WrongSign.apply), 16)
    torch.testing.assert_close(flipped[3], want[3], **GRAD_TOL)  # drhs needs T only: right
    for i in (0, 1, 2, 4):  # dk, dβ, dγ, dA
        assert not torch.allclose(flipped[i], want[i], **GRAD_TOL), i


# ---- the chunked form --------------------------------------------------------------------------------------
from test_delta_triton import _inputs, _rel  # noqa: E402  (the impl: triton tests' inputs and error)


def _chunked(name, solve, chunk=16, segment=0):
    """(out, dq, dk, dv, [dg,] dbeta) of the chunked form (37 tokens: the last chunk padded)."""
    gated, delta, normalize = gated_delta.VARIANTS[name]
    inputs = _inputs()
    used = inputs if gated else inputs[:3] + inputs[4:]  # delta_rule does not read g
    out = gated_delta.chunked(*inputs, gated=gated, delta=delta, normalize=normalize, chunk=chunk,
                              segment=segment, solve=solve)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    return [out, *torch.autograd.grad(out, used, dout)]


SOLVE_TOL = 1e-5  # relative norm error between the two solves, values and every gradient


@interp
@pytest.mark.parametrize("name,chunk,segment", [("delta_rule", 16, 0), ("gated_delta_rule", 16, 0),
                                                ("gated_delta_rule", 16, 20), ("delta_rule", 64, 0)])
def test_chunked_with_the_kernel_equals_solve_torch(name, chunk, segment):
    got = _chunked(name, "triton", chunk, segment)
    want = _chunked(name, "torch", chunk, segment)
    assert len(got) == (6 if name == "gated_delta_rule" else 5)
    errors = [_rel(a, b) for a, b in zip(got, want)]
    assert max(errors) < SOLVE_TOL, errors


@interp
def test_chunked_negative_control_is_caught(monkeypatch):
    """chunk_pieces through the kernel that skips a substitution step: values and gradients differ."""
    tt = _tril()
    want = _chunked("gated_delta_rule", "torch")
    monkeypatch.setattr(tt, "tril_inverse", functools.partial(tt.tril_inverse, skip_step=3))
    got = _chunked("gated_delta_rule", "triton")
    errors = [_rel(a, b) for a, b in zip(got, want)]
    assert errors[0] > 100 * SOLVE_TOL and min(errors) > SOLVE_TOL, errors


# ---- the method --------------------------------------------------------------------------------------------
def _ctx(method="delta_rule", params=None, head_dim=16, seq=20, device="cpu"):
    from test_delta_triton import _ctx as delta_ctx  # the same build context as the impl: triton tests

    return delta_ctx(method, params, head_dim=head_dim, seq=seq, device=device)


@interp
@pytest.mark.parametrize("method,params", [("delta_rule", {}), ("gated_delta_rule", {"impl": "triton", "block_v": 16})])
def test_method_with_solve_triton(method, params, monkeypatch):
    """The built method (solve: triton; with impl: triton too) equals solve torch in the timed form, the decode
    prefill and the state scan's summary, each through the kernel (counted), and its reference (the token
    loop) does not run it."""
    tt = _tril()
    calls = []
    forward = tt.inverse_forward
    monkeypatch.setattr(tt, "inverse_forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    fast = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16, "solve": "triton", **params})))
    plain = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16})))
    q, k, v, g, beta = (t.detach() for t in _inputs(length=20, dim=16))
    extras = {"beta": beta, **({"g": g} if method == "gated_delta_rule" else {})}
    assert set(fast.extras) == set(extras)
    out = fast.fn(q, k, v, **extras)
    assert len(calls) == 1
    assert _rel(out, plain.fn(q, k, v, **extras)) < SOLVE_TOL
    assert _rel(out, fast.reference(q, k, v, **extras)) < 1e-4
    assert len(calls) == 1  # neither solve torch nor the reference ran the kernel
    state = fast.decode.prefill(q, k, v, **extras)
    assert len(calls) == 2
    assert _rel(state, plain.decode.prefill(q, k, v, **extras)) < SOLVE_TOL
    got = fast.state_scan.summary(q, k, v, None, **extras)
    assert len(calls) == 4  # b and M: two chunked calls
    for a, b in zip(got, plain.state_scan.summary(q, k, v, None, **extras)):
        assert _rel(a, b) < SOLVE_TOL


@interp
def test_harness_row(cfg):
    """Through the case runner (the gate, gradients included): fp32 fwd_bwd with solve: triton is ok."""
    method = "delta_rule"
    cfg.update(methods=[method], masks=["causal"], seq_lens=[20], modes=["fwd_bwd"], head_dim=16,
               method_options={method: {"chunk": 16, "solve": "triton"}})
    frame = sweep_rows(cfg)
    assert len(frame) == 1
    assert frame.loc[0, "status"] == "ok", frame.loc[0, "reason"]


# ---- options (no interpreter needed) -----------------------------------------------------------------------
@pytest.mark.parametrize("method,params,field", [
    ("delta_rule", {"solve": "cuda"}, "solve"),
    ("gated_delta_rule", {"solve": True}, "solve"),
    ("gated_delta_rule", {"solve": "triton", "chunk": 256}, "chunk"),
    ("simple_gla", {"solve": "triton"}, "solve"),  # no triangular solve there
    ("simple_gla", {"solve": "torch"}, "solve"),
])
def test_bad_options_name_the_field(method, params, field):
    with pytest.raises(ValueError, match=f"method_options.{method}.{field}"):
        METHODS[method].build(_ctx(method, params))


@pytest.mark.parametrize("method", ["delta_rule", "gated_delta_rule"])
def test_without_cuda_or_interpreter_the_case_is_unsupported(method, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(Unsupported, match="solve=triton.*TRITON_INTERPRET=1"):
        METHODS[method].build(_ctx(method, {"solve": "triton"}))
    METHODS[method].build(_ctx(method, {"solve": "torch", "chunk": 256}))  # the control: solve torch builds


def test_chunk_pieces_rejects_an_unknown_solve():
    q, k, v, g, beta = (t.detach() for t in _inputs(length=16, dim=16))
    with pytest.raises(ValueError, match="solve must be one of"):
        gated_delta.chunk_pieces(q, k, v, g, beta, delta=True, chunk=16, solve="cublas")
