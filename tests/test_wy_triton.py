"""``solve: fused`` of the delta rules and simple_gla (methods/linear/wy_triton.py: every WY piece of a chunk,
with the inputs' fp32 conversion, ℓ2 normalisation and padding, by one Triton kernel) on the CPU through Triton's
interpreter:

- the kernel's six pieces (qg, attn, U, W, kd, last) equal ``gated_delta.chunk_pieces(solve='torch')`` on the
  inputs as ``chunked`` prepares them (``_prepare``), gated and ungated, with and without the delta term, with
  and without the normalisation, fp32 and bf16, strided inputs, a ragged last chunk, dk and dv over two blocks;
  ``chunk_pieces(solve='fused')`` (prepared inputs) equals them too;
- the gradients through the autograd Function (the backward recomputes the PyTorch pieces) equal autograd
  through the PyTorch pieces, also with upstream gradients on some pieces only and some inputs only;
- the built methods (delta_rule, gated_delta_rule, simple_gla) with ``solve: fused`` equal ``solve: torch``:
  outputs and every gradient, the decode prefill, the state scan's summary, a segmented run, bf16 inputs; a
  harness row is ok;
- the blocked inverse (16 x 16 diagonal blocks, then the off-diagonal merge by tl.dot): chunks of 32, 48
  (padded to 64), 64 and 20 (padded to 32), ragged lengths, fp32 and bf16, gated and ungated, normalised or not,
  equal the same pieces;
- negative controls: the kernel with the transposed inverse, or without β in the right-hand side, or without
  the inverse's off-diagonal merge (C = 32, 64; at C = 16, one block, that fault changes nothing), fails the
  same comparisons (pieces and the method's output); a backward that recomputes without the normalisation fails
  the gradient comparison;
- the backward kernel (``wy_backward: triton``, ``wy_triton.pieces_backward``): dq, dk, dv, dg, dβ equal
  autograd through ``reference_pieces`` with random incoming gradients on all six pieces (gated and ungated, with
  and without the delta term, normalised or not, C = 16, 32 and 20 padded to 32, ragged lengths, dk 8 / 16 / 32,
  fp32 and bf16) and with one piece's gradient at a time; through the built methods, outputs and every gradient
  equal ``solve: torch`` with the PyTorch recompute never run; negative controls (dA = −Tᵀ dT Tᵀ dropped, no
  reverse cumsum for dg, no normalisation projection) fail the comparisons they break;
- option errors name the field; without CUDA or the interpreter the case is ``unsupported``.

Tolerances: fp32 throughout (the interpreter's dots are numpy fp32; the kernel's forward substitution and the
triangular solve round differently), so the pieces agree to rtol 1e-5 / atol 1e-5 and the gradients to
rtol 1e-4 / atol 1e-5; the method's relative norm error between the two solves < 1e-5 (values and gradients).

As in tests/test_tril_triton.py, TRITON_INTERPRET=1 must be set before triton is first imported, so unless
pytest itself was started with it, the interpreter tests here skip and tests/test_triton_interpreter.py runs this
file in its child pytest (``TRITON_INTERPRET=1 pytest tests/test_wy_triton.py`` runs it alone).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from interpmark import INTERPRETING, interp, sweep_rows  # noqa: E402

from attnbench.methods import METHODS, as_prepared  # noqa: E402
from attnbench.methods.linear import gated_delta  # noqa: E402
from attnbench.methods.registry import Unsupported  # noqa: E402
from test_delta_triton import _ctx, _rel  # noqa: E402  (the impl: triton tests' build context and error)

PIECE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
SOLVE_TOL = 1e-5  # relative norm error between solve fused and solve torch, the method's values and gradients
NAMES = ("qg", "attn", "U", "W", "kd", "last")


def _wy():
    from attnbench.methods.linear import wy_triton

    return wy_triton


def _raw(length=37, heads=2, dk=32, dv=24, seed=0, dtype=torch.float32, strided=False, unit=False):
    """Raw inputs (q, k, v [1, H, L, d] not normalised; g log-sigmoid, mild; β in (0, 1)). 37 tokens: the last
    chunk of 16 padded; dk 32, dv 24 with the kernel's blocks of 16: two blocks each, the last of v partial.
    ``strided``: q, k, v as [B, L, H, d] tensors seen through a transpose (token stride H·d). ``unit``: q and k
    ℓ2-normalised here (the inputs chunk_pieces receives; the delta term's system on raw keys, k·k ~ d, is
    ill-conditioned: two exact solvers differ by ~1e-4 there)."""
    gen = torch.Generator().manual_seed(seed)

    def make(dim):
        if strided:
            return torch.randn(1, length, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(1, heads, length, dim, generator=gen).to(dtype)

    q, k, v = make(dk), make(dk), make(dv)
    if unit:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    g = F.logsigmoid(torch.randn(1, heads, length, generator=gen) + 2.0)
    beta = torch.rand(1, heads, length, generator=gen)
    return q, k, v, g, beta


def _want(q, k, v, g, beta, *, gated, delta, normalize, chunk=16):
    """chunk_pieces(solve='torch') on the inputs as ``chunked`` prepares them (fp32, normalised, padded)."""
    prepared = gated_delta._prepare(q, k, v, g, beta, gated, delta, normalize, chunk)[:5]
    return gated_delta.chunk_pieces(*prepared, delta=delta, chunk=chunk, solve="torch"), prepared


def _fused(q, k, v, g, beta, *, gated, delta, normalize, chunk=16, **kw):
    return _wy().wy_pieces(q, k, v, g if gated else None, beta if delta else None, delta=delta, chunk=chunk,
                           normalize=normalize, **kw)


def _assert_pieces_equal(got, want):
    assert len(got) == len(want) == 6
    for name, a, b in zip(NAMES, got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == torch.float32, (name, a.shape, b.shape, a.dtype)
        torch.testing.assert_close(a, b, **PIECE_TOL, msg=lambda m: f"{name}: {m}")


# ---- the kernel's pieces -----------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("gated,delta,normalize,dtype,strided", [
    (True, True, True, torch.float32, False),  # gated_delta_rule
    (False, True, True, torch.bfloat16, True),  # delta_rule, bf16, strided
    (True, False, False, torch.float32, True),  # simple_gla
    (True, True, False, torch.float32, False),  # the delta term on unit q, k used as given
])
def test_pieces_equal_chunk_pieces(gated, delta, normalize, dtype, strided):
    raw = _raw(dtype=dtype, strided=strided, unit=delta and not normalize)
    want, prepared = _want(*raw, gated=gated, delta=delta, normalize=normalize)
    got = _fused(*raw, gated=gated, delta=delta, normalize=normalize)
    _assert_pieces_equal(got, want)
    assert got[2].shape == (1, 2, 3, 16, 24)  # 37 tokens: three chunks of 16
    # chunk_pieces(solve='fused') on the prepared inputs (what the loop gets): the same pieces
    _assert_pieces_equal(gated_delta.chunk_pieces(*prepared, delta=delta, chunk=16, solve="fused"), want)
    # the pieces are not trivial: a real decay, a real solve
    qg, attn, U, W, kd, last = got
    beta_v = prepared[2] * prepared[4][..., None]
    assert (last < 1).all() if gated else torch.equal(last, torch.ones_like(last))
    if delta:
        assert _rel(U.reshape(beta_v.shape), beta_v) > 0.05 and W.abs().max() > 0.1


@interp
@pytest.mark.parametrize("fault,wrong", [("transpose_t", ("U", "W")), ("no_beta", ("U", "W"))])
def test_negative_controls_are_caught(fault, wrong):
    """A kernel with the transposed inverse, or without β on the right-hand side: the same comparison fails for
    U and W (the other pieces, which do not use T, still agree)."""
    raw = _raw(seed=3)
    kw = dict(gated=True, delta=True, normalize=True)
    want, _ = _want(*raw, **kw)
    got = _fused(*raw, **kw, fault=fault)
    for name, a, b in zip(NAMES, got, want):
        if name in wrong:
            assert not torch.allclose(a, b, **PIECE_TOL), name
            assert _rel(a, b) > 1e-2, name
        else:
            torch.testing.assert_close(a, b, **PIECE_TOL)


@interp
@pytest.mark.parametrize("chunk,length,gated,normalize,dtype", [
    (32, 75, True, True, torch.float32),  # two blocks of 16; the last chunk ragged
    (64, 100, False, True, torch.bfloat16),  # four blocks (the default chunk), delta_rule, bf16
    (64, 130, True, False, torch.float32),  # unit q, k used as given
    (48, 100, True, True, torch.float32),  # C not a power of two: padded to 64, a fourth block of padding
    (20, 45, False, False, torch.float32),  # C not a multiple of 16: padded to 32
])
def test_blocked_inverse_pieces_equal_chunk_pieces(chunk, length, gated, normalize, dtype):
    """Chunks of several 16 x 16 blocks (the blocked inverse's merge runs): the six pieces equal
    chunk_pieces(solve='torch'), at the same tolerance."""
    raw = _raw(length=length, heads=1, dk=16, dv=16, seed=5, dtype=dtype, unit=not normalize)
    kw = dict(gated=gated, delta=True, normalize=normalize, chunk=chunk)
    want, prepared = _want(*raw, **kw)
    got = _fused(*raw, **kw)
    _assert_pieces_equal(got, want)
    assert got[2].shape == (1, 1, -(-length // chunk), chunk, 16)
    # the off-diagonal blocks of T matter here: U differs from the diagonal blocks' solution
    beta_v = prepared[2] * prepared[4][..., None]
    assert _rel(got[2].reshape(beta_v.shape), beta_v) > 0.05


@interp
@pytest.mark.parametrize("chunk,fault", [(64, "no_offdiag"), (32, "no_offdiag"), (64, "transpose_t"),
                                         (64, "no_beta")])
def test_blocked_negative_controls_are_caught(chunk, fault):
    """At C = 32 and 64 (two and four blocks): the inverse without its off-diagonal merge (the diagonal blocks
    only), the transposed inverse, or no β on the right-hand side fail the comparison for U and W; the pieces
    that do not use T still agree."""
    raw = _raw(length=2 * chunk + 7, heads=1, dk=16, dv=16, seed=6)
    kw = dict(gated=True, delta=True, normalize=True, chunk=chunk)
    want, _ = _want(*raw, **kw)
    got = _fused(*raw, **kw, fault=fault)
    for name, a, b in zip(NAMES, got, want):
        if name in ("U", "W"):
            assert _rel(a, b) > 1e-2, name
        else:
            torch.testing.assert_close(a, b, **PIECE_TOL)


@interp
def test_no_offdiag_is_a_no_op_with_one_block():
    """C = 16 is one block: dropping the merge changes nothing (so the control above tests the merge, not
    something else the fault touches)."""
    raw = _raw(seed=3)
    kw = dict(gated=True, delta=True, normalize=True)
    for a, b in zip(_fused(*raw, **kw, fault="no_offdiag"), _fused(*raw, **kw)):
        assert torch.equal(a, b)


# ---- gradients ---------------------------------------------------------------------------------------------
def _piece_grads(fn, raw, gated, delta, which=NAMES, need=(True,) * 5, seed=4):
    """Gradients of a random linear functional of the pieces named in ``which``, in the inputs flagged by
    ``need`` (q, k, v, g, beta) that the variant reads."""
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip(raw, need)]
    pieces = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((p * torch.randn(p.shape, generator=gen)).sum() for name, p in zip(NAMES, pieces)
               if p is not None and name in which)
    used = [t for t, n, read in zip(leaves, need, (True, True, True, gated, delta)) if n and read]
    return torch.autograd.grad(loss, used)


@interp
@pytest.mark.parametrize("gated,delta,which,need", [
    (True, True, NAMES, (True,) * 5),
    (False, True, ("U", "W"), (False, True, True, False, True)),  # some pieces, some inputs
    (True, False, ("qg", "attn", "last"), (False, True, False, True, False)),
])
def test_gradients_equal_the_pytorch_pieces(gated, delta, which, need):
    raw = _raw(seed=1)
    kw = dict(gated=gated, delta=delta, normalize=True)

    def fused(*leaves):
        return _fused(*leaves, **kw)

    def torch_pieces(*leaves):
        return _want(*leaves, **kw)[0]

    got = _piece_grads(fused, raw, gated, delta, which, need)
    want = _piece_grads(torch_pieces, raw, gated, delta, which, need)
    assert len(got) == len(want) >= 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL)
        assert b.abs().max() > 1e-3  # a real gradient


@interp
def test_gradient_negative_control_is_caught(monkeypatch):
    """A backward that recomputes the pieces without the normalisation (its forward is right): the gradient
    comparison above fails."""
    wt = _wy()
    recompute = wt.reference_pieces
    monkeypatch.setattr(wt, "reference_pieces", lambda *a, **kw: recompute(*a, **{**kw, "normalize": False}))
    raw = _raw(seed=1)
    kw = dict(gated=True, delta=True, normalize=True)
    got = _piece_grads(lambda *leaves: _fused(*leaves, **kw), raw, True, True)
    want = _piece_grads(lambda *leaves: _want(*leaves, **kw)[0], raw, True, True)
    assert not torch.allclose(got[0], want[0], **GRAD_TOL)  # dq
    assert not torch.allclose(got[1], want[1], **GRAD_TOL)  # dk


# ---- the method --------------------------------------------------------------------------------------------
def _method_inputs(method, length=20, dim=16, seed=0, dtype=torch.float32):
    gated, delta, _ = gated_delta.VARIANTS[method]
    q, k, v, g, beta = _raw(length=length, dk=dim, dv=dim, seed=seed)
    args = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    extras = {}
    if gated:
        extras["g"] = g.requires_grad_()
    if delta:
        extras["beta"] = beta.requires_grad_()
    return args, extras


def _run(prepared, args, extras, seed=9):
    """(out, gradients of q, k, v and the extras) of the method's timed form."""
    out = prepared.fn(*args, **extras)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return [out, *torch.autograd.grad(out, [*args, *extras.values()], dout)]


@interp
@pytest.mark.parametrize("method", list(gated_delta.VARIANTS))
def test_method_with_solve_fused_equals_solve_torch(method, monkeypatch):
    """Through the method builder: the timed form's output and the gradients of q, k, v, g, beta; the decode
    prefill; the state scan's summary (M and b) — each through the kernel (counted); the reference does not
    run it."""
    wt = _wy()
    calls = []
    forward = wt.pieces_forward
    monkeypatch.setattr(wt, "pieces_forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    fast = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16, "solve": "fused"})))
    plain = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16})))
    args, extras = _method_inputs(method)
    got = _run(fast, args, extras)
    assert len(calls) == 1
    want = _run(plain, args, extras)
    assert len(got) == 3 + 1 + len(extras)
    errors = [_rel(a, b) for a, b in zip(got, want)]
    assert max(errors) < SOLVE_TOL, errors
    assert _rel(got[0], fast.reference(*args, **extras)) < 1e-4
    assert len(calls) == 1  # neither solve torch nor the reference ran the kernel
    detached = [t.detach() for t in args]
    plain_extras = {name: t.detach() for name, t in extras.items()}
    assert _rel(fast.decode.prefill(*detached, **plain_extras), plain.decode.prefill(*detached, **plain_extras)) \
        < SOLVE_TOL
    assert len(calls) == 2
    for a, b in zip(fast.state_scan.summary(*detached, None, **plain_extras),
                    plain.state_scan.summary(*detached, None, **plain_extras)):
        assert _rel(a, b) < SOLVE_TOL
    assert len(calls) == 4  # b and M: two chunked calls


@interp
@pytest.mark.parametrize("segment,dtype", [(20, torch.float32), (0, torch.bfloat16)])
def test_chunked_segmented_and_bf16(segment, dtype):
    """gated_delta_rule's chunked form with solve fused equals solve torch: in segments of 20 tokens (the
    kernel in every segment, each checkpointed, the state carried) and with bf16 inputs (converted in the
    kernel); values and gradients."""
    args, extras = _method_inputs("gated_delta_rule", length=37, dtype=dtype)

    def run(solve):
        out = gated_delta.chunked(*args, **extras, chunk=16, segment=segment, solve=solve)
        assert out.dtype == dtype
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
        return [out, *torch.autograd.grad(out, [*args, *extras.values()], dout)]

    tol = SOLVE_TOL if dtype == torch.float32 else 1e-2  # bf16: the output (and the input grads) rounded to bf16
    errors = [_rel(a, b) for a, b in zip(run("fused"), run("torch"))]
    assert max(errors) < tol, errors


@interp
def test_method_negative_control_is_caught(monkeypatch):
    """The method through a kernel without β on the right-hand side: its output fails the comparison."""
    wt = _wy()
    method = "gated_delta_rule"
    forward = wt.pieces_forward
    monkeypatch.setattr(wt, "pieces_forward", lambda *a, **kw: forward(*a, **{**kw, "fault": "no_beta"}))
    fast = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16, "solve": "fused"})))
    plain = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16})))
    args, extras = _method_inputs(method)
    error = _rel(fast.fn(*args, **extras), plain.fn(*args, **extras))
    assert error > 100 * SOLVE_TOL, error


@interp
def test_harness_row(cfg):
    """Through the case runner (the gate, gradients included): fp32 fwd_bwd with solve: fused is ok."""
    method = "gated_delta_rule"
    cfg.update(methods=[method], masks=["causal"], seq_lens=[20], modes=["fwd_bwd"], head_dim=16,
               method_options={method: {"chunk": 16, "solve": "fused"}})
    frame = sweep_rows(cfg)
    assert len(frame) == 1
    assert frame.loc[0, "status"] == "ok", frame.loc[0, "reason"]


# ---- options and arguments (no interpreter needed) ---------------------------------------------------------
@pytest.mark.parametrize("method,params,field", [
    ("delta_rule", {"solve": "fuse"}, "solve"),
    ("gated_delta_rule", {"solve": "fused", "chunk": 256}, "chunk"),
    ("simple_gla", {"solve": "triton"}, "solve"),  # no triangular solve: only fused applies
    ("simple_gla", {"solve": "fused", "chunk": 200}, "chunk"),
])
def test_bad_options_name_the_field(method, params, field):
    with pytest.raises(ValueError, match=f"method_options.{method}.{field}"):
        METHODS[method].build(_ctx(method, params))


@pytest.mark.parametrize("method", list(gated_delta.VARIANTS))
def test_without_cuda_or_interpreter_the_case_is_unsupported(method, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(Unsupported, match="solve=fused.*TRITON_INTERPRET=1"):
        METHODS[method].build(_ctx(method, {"solve": "fused"}))
    METHODS[method].build(_ctx(method, {"chunk": 16}))  # the control: the PyTorch pieces build


@pytest.mark.parametrize("kw,match", [
    (dict(chunk=0), "chunk must be in"),
    (dict(chunk=16, dot_precision="fp16"), "dot_precision"),
    (dict(chunk=16, block_k=24), "block_k"),
    (dict(chunk=16, fault="other"), "fault"),
    (dict(chunk=16, beta=torch.rand(1, 2, 5)), "beta must be"),
    (dict(chunk=16, v=torch.randn(1, 2, 37, 8, dtype=torch.float64)), "v must be"),
])
def test_bad_arguments_fail_before_the_kernel(kw, match):
    q, k, v, g, beta = _raw()
    args = dict(q=q, k=k, v=v, g=g, beta=beta, delta=True)
    with pytest.raises((ValueError, TypeError), match=match):
        _wy().pieces_forward(**{**args, **kw})


# ---- the backward kernel (wy_backward: triton, wy_triton.pieces_backward) -----------------------------------
BF16_GRAD_TOL = dict(rtol=1e-2, atol=1e-4)  # bf16 inputs: both gradients rounded to bf16 (one ulp ~ 4e-3)


def _reference_grads(raw, dpieces, *, delta, chunk, normalize):
    """Autograd through reference_pieces (conversion, normalisation, padding, chunk_pieces(solve='torch')) for
    the incoming gradients ``dpieces`` (None: none), in every input the variant reads (zeros where unused)."""
    wt = _wy()
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in raw]
    pieces = wt.reference_pieces(*leaves, delta=delta, chunk=chunk, normalize=normalize)
    pairs = [(p, d) for p, d in zip(pieces, dpieces) if p is not None and d is not None and p.requires_grad]
    used = [t for t in leaves if t is not None]
    if not pairs:
        return [torch.zeros_like(t) for t in used]
    got = torch.autograd.grad([p for p, _ in pairs], used, [d for _, d in pairs], allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(used, got)]


def _random_dpieces(raw, *, delta, chunk, only=None, seed=5):
    """Random incoming gradients of the six pieces (all, or only the one named ``only``; the others None)."""
    q, _, v, _, _ = raw
    batch, heads, length, dk = q.shape
    n = -(-length // chunk)
    shapes = dict(qg=(n, chunk, dk), attn=(n, chunk, chunk), U=(n, chunk, v.shape[-1]), W=(n, chunk, dk),
                  kd=(n, chunk, dk), last=())
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in NAMES:
        skip = (name == "W" and not delta) or (only is not None and name != only)
        out.append(None if skip else torch.randn(batch, heads, *((n,) if name == "last" else shapes[name]),
                                                  generator=gen))
    return out


def _kernel_vs_autograd(gated, delta, normalize, *, chunk=16, length=37, dk=16, dv=24, dtype=torch.float32,
                        only=None, fault=None):
    raw = list(_raw(length=length, dk=dk, dv=dv, dtype=dtype, unit=delta and not normalize))
    raw[3] = raw[3] if gated else None
    raw[4] = raw[4] if delta else None
    dpieces = _random_dpieces(raw, delta=delta, chunk=chunk, only=only)
    got = [t for t in _wy().pieces_backward(*raw, dpieces, delta=delta, chunk=chunk, normalize=normalize,
                                             fault=fault) if t is not None]
    want = _reference_grads(raw, dpieces, delta=delta, chunk=chunk, normalize=normalize)
    assert [t.dtype for t in got] == [t.dtype for t in want] and [t.shape for t in got] == [t.shape for t in want]
    return got, want


@interp
@pytest.mark.parametrize("gated,delta,normalize,chunk,length,dk,dtype", [
    (True, True, True, 16, 37, 16, torch.float32),  # gated_delta_rule
    (False, True, True, 16, 37, 8, torch.float32),  # delta_rule, dk 8 (one partial block)
    (True, False, False, 16, 37, 32, torch.float32),  # simple_gla, dk over two blocks
    (True, True, False, 16, 37, 16, torch.float32),  # the delta term on unit q, k used as given
    (True, True, True, 32, 45, 32, torch.float32),  # two 16 x 16 blocks of the inverse, ragged
    (True, True, True, 20, 45, 16, torch.float32),  # C = 20 padded to 32 in registers
    (False, True, True, 16, 37, 16, torch.bfloat16),  # bf16 inputs, bf16 gradients
])
def test_backward_kernel_equals_autograd(gated, delta, normalize, chunk, length, dk, dtype):
    """pieces_backward with random incoming gradients on all six pieces equals autograd through
    reference_pieces, in every input the variant reads (q, k, v; g gated; β with the delta term)."""
    got, want = _kernel_vs_autograd(gated, delta, normalize, chunk=chunk, length=length, dk=dk, dtype=dtype)
    tol = GRAD_TOL if dtype == torch.float32 else BF16_GRAD_TOL
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
        assert b.abs().max() > 1e-3, name  # a real gradient


@interp
@pytest.mark.parametrize("only", NAMES)
def test_backward_kernel_one_piece_at_a_time(only):
    """Incoming gradient on one piece only (the others None: zero), gated_delta_rule at C = 32, ragged: each
    piece's path through the backward on its own."""
    got, want = _kernel_vs_autograd(True, True, True, chunk=32, length=45, only=only)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m: f"{only} -> {name}: {m}")
    assert max(b.abs().max() for b in want) > 1e-3


@interp
@pytest.mark.parametrize("fault,caught", [
    ("no_dinv", ("dk", "dg", "dbeta")),  # the −Tᵀ dT Tᵀ term dropped
    ("no_revcumsum", ("dg",)),  # dg = dγ, no reverse cumsum
    ("no_norm_proj", ("dq", "dk")),  # the normalisation's projection left out
])
def test_backward_kernel_negative_controls_are_caught(fault, caught):
    got, want = _kernel_vs_autograd(True, True, True, chunk=32, length=45, fault=fault)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), got, want):
        if name in caught:
            assert not torch.allclose(a, b, **GRAD_TOL), (fault, name)


@interp
@pytest.mark.parametrize("method", list(gated_delta.VARIANTS))
def test_method_with_triton_wy_backward_equals_solve_torch(method, monkeypatch):
    """Through the method builder with ``solve: fused, wy_backward: triton``: the output and every gradient
    equal ``solve: torch``; the backward kernel ran (counted) and the PyTorch recompute did not."""
    wt = _wy()
    calls = []
    backward = wt.pieces_backward
    monkeypatch.setattr(wt, "pieces_backward", lambda *a, **kw: calls.append(1) or backward(*a, **kw))
    monkeypatch.setattr(wt, "reference_pieces", lambda *a, **kw: pytest.fail("the PyTorch recompute ran"))
    fast = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16, "solve": "fused", "wy_backward": "triton"})))
    plain = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16})))
    args, extras = _method_inputs(method, length=37)
    got = _run(fast, args, extras)
    assert len(calls) == 1
    want = _run(plain, args, extras)
    errors = [_rel(a, b) for a, b in zip(got, want)]
    assert max(errors) < SOLVE_TOL, errors


@interp
def test_method_backward_negative_control_is_caught(monkeypatch):
    """The method with the backward kernel's reverse cumsum left out: the gate's gradient fails."""
    wt = _wy()
    backward = wt.pieces_backward
    monkeypatch.setattr(wt, "pieces_backward", lambda *a, **kw: backward(*a, **{**kw, "fault": "no_revcumsum"}))
    method = "gated_delta_rule"
    fast = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16, "solve": "fused", "wy_backward": "triton"})))
    plain = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 16})))
    args, extras = _method_inputs(method, length=37)
    got, want = _run(fast, args, extras), _run(plain, args, extras)
    assert max(_rel(a, b) for a, b in zip(got[:4], want[:4])) < SOLVE_TOL  # out, dq, dk, dv untouched
    assert _rel(got[4], want[4]) > 100 * SOLVE_TOL  # dg


@pytest.mark.parametrize("method,params,field", [
    ("delta_rule", {"solve": "fused", "wy_backward": "cuda"}, "wy_backward"),
    ("delta_rule", {"wy_backward": "triton"}, "wy_backward"),  # no solve fused: nothing to run it
    ("gated_delta_rule", {"solve": "triton", "wy_backward": "triton"}, "wy_backward"),
    ("simple_gla", {"wy_backward": "torch"}, "wy_backward"),
    ("gated_delta_rule", {"solve": "fused", "wy_backward": "triton", "chunk": 128}, "chunk"),  # shared memory
    ("delta_rule", {"solve": "fused", "wy_backward": "triton"}, "chunk"),  # the default chunk, 64: wrong on the H200
    ("gated_delta_rule", {"solve": "fused", "wy_backward": "triton", "chunk": 64}, "chunk"),
    ("delta_rule", {"solve": "fused", "wy_precision": "bf16"}, "wy_precision"),  # not a precision of the kernel
    ("delta_rule", {"wy_precision": "tf32"}, "wy_precision"),  # no solve fused: no kernel to take it
    ("gated_delta_rule", {"solve": "triton", "wy_precision": "tf32"}, "wy_precision"),
])
def test_bad_wy_backward_names_the_field(method, params, field):
    with pytest.raises(ValueError, match=f"method_options.{method}.{field}"):
        METHODS[method].build(_ctx(method, params))


def test_wy_backward_kernel_refuses_chunk_64_on_a_gpu_only(monkeypatch):
    """pieces_backward takes C = 64 off the GPU (the interpreter, ptxas studies) and refuses it for CUDA inputs
    (MAX_BACKWARD_CHUNK: wrong gradients on the H200); C = 32 passes the check on both. The launch is stubbed
    (recorded, not run): only the check is under test."""
    wt = _wy()
    assert wt.MAX_BACKWARD_CHUNK == 32 < wt.COMPILE_BACKWARD_CHUNK == 64
    launched = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs["C"])

    monkeypatch.setattr(wt, "jit_kernel", lambda src: Stub())

    class FakeCuda(torch.Tensor):  # is_cuda only: the check runs before any launch
        @property
        def is_cuda(self):
            return True

    q = torch.zeros(1, 1, 64, 16).as_subclass(FakeCuda)
    with pytest.raises(ValueError, match="chunk must be <= 32 on a GPU"):
        wt.pieces_backward(q, q, q, None, None, [None] * 6, delta=True, chunk=64)
    wt.pieces_backward(q, q, q, None, None, [None] * 6, delta=True, chunk=32)  # within the GPU limit
    plain = torch.zeros(1, 1, 64, 16)
    wt.pieces_backward(plain, plain, plain, None, None, [None] * 6, delta=True, chunk=64)  # off the GPU
    assert launched == [32, 64]


def test_wy_backward_default_is_torch(monkeypatch):
    """solve: fused alone keeps the PyTorch recompute (the internal solve 'fused'); wy_backward: triton
    selects the kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ctx = _ctx("delta_rule", {"solve": "fused"})
    assert gated_delta.solve_choice(ctx, 16, True) == "fused"
    ctx = _ctx("delta_rule", {"solve": "fused", "wy_backward": "triton"})
    assert gated_delta.FUSED[gated_delta.solve_choice(ctx, 16, True)] == "triton"


def test_fused_options_parse_the_internal_solve():
    """solve_choice's ``<solve>@<precision>`` strings map to the kernel's options; anything else is not fused."""
    assert gated_delta.fused_options("fused") == {"backward": "torch"}
    assert gated_delta.fused_options("fused@tf32") == {"backward": "torch", "dot_precision": "tf32"}
    assert gated_delta.fused_options("fused+triton_backward@ieee") == {"backward": "triton", "dot_precision": "ieee"}
    assert gated_delta.fused_options("torch") is None and gated_delta.fused_options("fused@bf16") is None
    # gated_delta keeps its own copy (it does not import triton until a fused solve runs): the kernel's list
    assert set(gated_delta.WY_PRECISIONS) == set(_wy().PRECISIONS)
