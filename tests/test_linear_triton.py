"""linear_attn_triton (methods/linear/linear_triton.py) on the CPU through Triton's interpreter:
values and gradients against the readable reference in fp32 and bf16, lengths that are not a multiple of the chunk, GQA, the causal leak probe, negative
controls (the intra-chunk mask switched off), the harness rows and the refusal without CUDA or interpreter.

Triton 3.6's interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest), which roughly doubles
the bf16 error; the child process therefore patches the interpreter's conversion to round to nearest even
(``_round_bf16_to_nearest``, itself tested against torch's conversion), and the bf16 backward is held to the
harness's gate tolerance (bench/measure/gate.py) at a length of many chunks and segments, with a broken
backward term as the negative control. The GPU test (tests/test_linear_gpu.py) holds the kernel to the
same tolerance on the device.

TRITON_INTERPRET=1 must be set before triton is first imported, and setting it in the pytest process would
switch every later test to the interpreter. So, unless pytest itself was started with TRITON_INTERPRET=1, the
tests here skip and tests/test_triton_interpreter.py runs this file (with tests/test_simple_gla_triton.py) in one
child pytest with TRITON_INTERPRET=1, failing with the child's report when any test there fails. To run this
file alone: ``TRITON_INTERPRET=1 pytest tests/test_linear_triton.py``.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from interpmark import INTERPRETING, interp, sweep_rows  # noqa: E402

from attnbench.measure.gate import TOLERANCE  # noqa: E402
from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared  # noqa: E402
from attnbench.methods.linear import common  # noqa: E402
from attnbench.methods.registry import Unsupported  # noqa: E402


def _round_bf16_to_nearest():
    """Make the interpreter convert fp32 -> bf16 as the GPU does (round to nearest even, via torch) instead of
    truncating; returns the original conversion. Only in the child (TRITON_INTERPRET=1)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_convert_float", None)
    assert original is not None, "triton.runtime.interpreter._convert_float is gone: update the rounding patch"
    if getattr(original, "rounds_to_nearest", False):
        return original.original

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            wide = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            return wide.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(data.shape)
        return original(data, src, dst, rounding_mode)

    convert.rounds_to_nearest = True
    convert.original = original
    interpreter._convert_float = convert
    return original


if INTERPRETING:
    _round_bf16_to_nearest()


def _kernels():
    from attnbench.methods.linear import linear_triton

    return linear_triton


def _rand(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()


def _reference(q, k, v):
    group = q.shape[1] // k.shape[1]
    fq = F.elu(q) + 1
    fk = (F.elu(k) + 1).repeat_interleave(group, 1)
    return common.naive_linear(fq, fk, v.repeat_interleave(group, 1), causal=True, offset=0, eps=1e-6)


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _errors(fn, q, k, v, seed=9):
    """rel errors of (out, dq, dk, dv) of ``fn`` against the fp32 reference on the same (rounded) inputs."""
    out = fn(q, k, v)
    dout = _rand(*out.shape, seed=seed, dtype=torch.float32)
    got = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_in)
    want = torch.autograd.grad(ref, ref_in, dout)
    return [_rel(out, ref)] + [_rel(g, w) for g, w in zip(got, want)]


# seq 37 and 40: not multiples of the chunk (the tail chunk is masked in the kernel); head dim 8: padded to
# tl.dot's 16 in registers; 4 query heads on 2 kv heads: GQA; seq 12 < chunk 32: a single partial chunk
@interp
# seg_chunks 1 / 2 / 3: several segments run in parallel from the state kernel's states (the last one
# partial; 70 tokens on 2 kv heads under GQA); seg_chunks 4 at 37 tokens: one segment (no state kernel)
@pytest.mark.parametrize("seq,dim,heads,kv_heads,chunk,seg", [(37, 16, 2, 2, 16, 4), (40, 8, 4, 2, 16, 1),
                                                              (12, 16, 1, 1, 32, 4), (70, 16, 4, 2, 16, 2),
                                                              (100, 24, 2, 2, 16, 3)])
def test_kernel_matches_reference_fp32_values_and_grads(seq, dim, heads, kv_heads, chunk, seg):
    lt = _kernels()
    q = _rand(1, heads, seq, dim, seed=1)
    k, v = _rand(1, kv_heads, seq, dim, seed=2), _rand(1, kv_heads, seq, dim, seed=3)
    errors = _errors(lambda a, b, c: lt.linear_attn(a, b, c, chunk=chunk, block_v=16, seg_chunks=seg), q, k, v)
    assert max(errors) < 1e-5, errors


@interp
def test_negative_control_segments_without_carried_state_are_caught():
    lt = _kernels()
    q, k, v = (_rand(1, 2, 70, 16, seed=s) for s in (1, 2, 3))
    errors = _errors(lambda a, b, c: lt.linear_attn(a, b, c, chunk=16, block_v=16, seg_chunks=1, carry=False),
                     q, k, v)
    assert min(errors) > 5e-2, errors


@interp
def test_backward_leaves_its_inputs_alone():
    """the backward works in place on fp32 temporaries: fp32 inputs (where .float() is no copy) and the
    incoming gradient must come out unchanged."""
    lt = _kernels()
    q, k, v = (_rand(1, 2, 40, 16, seed=s) for s in (1, 2, 3))
    dout = _rand(1, 2, 40, 16, seed=4).detach()
    before = [t.detach().clone() for t in (q, k, v, dout)]
    torch.autograd.grad(lt.linear_attn(q, k, v, chunk=16, block_v=16, seg_chunks=1), (q, k, v), dout)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, (q, k, v, dout)))


@interp
def test_interpreter_rounds_bf16_to_nearest_like_the_gpu():
    """The patched conversion equals torch's fp32 -> bf16 (round to nearest even); the interpreter's own
    (truncation) does not: the negative control."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3).numpy()
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(interpreter._convert_float(x, tl.float32, tl.bfloat16, None), want)
    original = _round_bf16_to_nearest()
    assert not np.array_equal(original(x, tl.float32, tl.bfloat16, None), want)


@interp
def test_kernel_matches_reference_bf16_values_and_grads():
    lt = _kernels()
    q, k, v = (_rand(2, 2, 45, 32, seed=s, dtype=torch.bfloat16) for s in (4, 5, 6))
    errors = _errors(lambda a, b, c: lt.linear_attn(a, b, c, chunk=16, block_v=16, seg_chunks=2), q, k, v)
    out_tol, grad_tol = TOLERANCE["bfloat16"]
    assert errors[0] < out_tol and max(errors[1:]) < grad_tol, errors
    broken = _errors(lambda a, b, c: lt.linear_attn(a, b, c, chunk=16, block_v=16, mask_intra=False), q, k, v)
    assert min(broken) > 5e-2, broken  # the negative control is far outside the bf16 bound


@interp
def test_bf16_backward_within_the_gate_over_many_chunks_and_segments():
    """bf16 values and gradients within the harness's bf16 gate (the tolerance that does not widen with length)
    against the fp32 reference, at 128 tokens in chunks of 16 (8 chunks, 4 segments of 2, GQA 2 on 1): the
    backward's dD terms cross every segment boundary through the carried sums (measured here: dq 0.0057, dk
    0.0044, dv 0.0033; φ(q), φ(k) rounded to bf16 alone cost dq 0.0037). Negative control: the same backward
    with those carried sums dropped (``carry_u=False``) leaves dq and dk far outside the gate (0.62, 0.039),
    while the output and dv, which do not use them, stay inside."""
    lt = _kernels()
    q = _rand(1, 2, 128, 32, seed=11, dtype=torch.bfloat16)
    k, v = (_rand(1, 1, 128, 32, seed=s, dtype=torch.bfloat16) for s in (12, 13))
    out_tol, grad_tol = TOLERANCE["bfloat16"]
    run = dict(chunk=16, block_v=32, seg_chunks=2)
    errors = _errors(lambda a, b, c: lt.linear_attn(a, b, c, **run), q, k, v)
    assert errors[0] < out_tol and max(errors[1:]) < grad_tol, errors
    broken = _errors(lambda a, b, c: lt.linear_attn(a, b, c, carry_u=False, **run), q, k, v)
    assert broken[1] > 10 * grad_tol and broken[2] > 3 * grad_tol, broken
    assert broken[0] < out_tol and broken[3] < grad_tol, broken


@interp
def test_fused_feature_map_matches_the_precomputed_one():
    """``feature_map="fused"`` (φ in the kernels) and the default (φ written once) give the same values and
    gradients (fp32, several segments, GQA), both on the reference."""
    lt = _kernels()
    q = _rand(1, 4, 70, 16, seed=1)
    k, v = _rand(1, 2, 70, 16, seed=2), _rand(1, 2, 70, 16, seed=3)
    for mode in ("fused", "precomputed"):
        errors = _errors(lambda a, b, c: lt.linear_attn(a, b, c, chunk=16, block_v=16, seg_chunks=2,
                                                        feature_map=mode), q, k, v)
        assert max(errors) < 1e-5, (mode, errors)
    with pytest.raises(ValueError, match="feature_map"):
        lt.linear_attn(q, k, v, feature_map="elu")


@interp
def test_negative_control_intra_chunk_mask_off_is_caught():
    lt = _kernels()
    q, k, v = _rand(1, 2, 37, 16, seed=1), _rand(1, 2, 37, 16, seed=2), _rand(1, 2, 37, 16, seed=3)
    errors = _errors(lambda a, b, c: lt.linear_attn(a, b, c, chunk=16, block_v=16, mask_intra=False), q, k, v)
    assert errors[0] > 1e-2 and min(errors[1:]) > 1e-2, errors


@interp
def test_reverse_scan_is_the_flipped_causal_scan():
    lt = _kernels()
    a, b, c = (_rand(1, 2, 29, 16, seed=s).detach() for s in (1, 2, 3))
    rev = lt.chunk_scan(a, b, c, chunk=16, block_v=16, reverse=True)
    flip = lt.chunk_scan(a.flip(2), b.flip(2), c.flip(2), chunk=16, block_v=16).flip(2)
    assert _rel(rev, flip) < 1e-6


def _leaks(fn, seq=37, dim=16, split=20):
    q, k, v = (_rand(1, 2, seq, dim, seed=s).detach() for s in (4, 5, 6))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, split:] = _rand(1, 2, seq - split, dim, seed=7).detach() * 3
    v2[:, :, split:] = _rand(1, 2, seq - split, dim, seed=8).detach() * 3
    base, moved = fn(q, k, v), fn(q, k2, v2)
    return not torch.allclose(base[:, :, :split], moved[:, :, :split], atol=1e-6)


@interp
def test_kernel_does_not_leak_and_the_probe_catches_the_unmasked_variant():
    lt = _kernels()
    assert not _leaks(lambda q, k, v: lt.linear_attn(q, k, v, chunk=16, block_v=16))
    assert _leaks(lambda q, k, v: lt.linear_attn(q, k, v, chunk=16, block_v=16, mask_intra=False))


def _scan_reference(a, b, c, *, reverse=False, ea=None, eb=None, rdiv=None, x=None):
    """o_i = Σ_{j<=i} (a_i·b_j + ea_i + eb_j) c_j (reverse: j >= i), / rdiv_i, · φ'(x_i); fp32, heads broadcast
    like the kernel (a's and b's heads both divide the output's)."""
    heads = max(a.shape[1], b.shape[1])
    a, b, c = (t.float().repeat_interleave(heads // t.shape[1], 1) for t in (a, b, c))
    scores = a @ b.transpose(-1, -2)
    if ea is not None:
        scores = scores + ea[..., :, None]
    if eb is not None:
        scores = scores + eb.repeat_interleave(heads // eb.shape[1], 1)[..., None, :]
    seq = a.shape[2]
    keep = torch.ones(seq, seq, dtype=torch.bool).tril()
    out = scores.masked_fill(~(keep.T if reverse else keep), 0.0) @ c
    if rdiv is not None:
        out = out / rdiv[..., None]
    if x is not None:
        x = x.float().repeat_interleave(heads // x.shape[1], 1)
        out = out * torch.where(x > 0, 1.0, x.exp())
    return out


@interp
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_with_row_terms_matches_its_formula(reverse):
    """The generic scan's backward pieces on their own (fp32, 50 tokens in chunks of 16: 4 segments of one
    chunk, a tail chunk). Negative controls: the carried row-term sums dropped (``carry_sums=False``)."""
    lt = _kernels()
    # fp32, summed in another order than the reference (the interpreter's numpy matmuls, threaded): 1.9e-5 seen
    # once on a loaded 2-core machine at 1e-5; the negative controls stay above 1e-2
    TOL = 1e-4  # noqa: N806
    run = dict(chunk=16, block_v=16, seg_chunks=1, reverse=reverse)
    a = _rand(1, 1, 50, 16, seed=1).detach()
    b, c = _rand(1, 2, 50, 16, seed=2).detach(), _rand(1, 2, 50, 24, seed=3).detach()
    eb, x = _rand(1, 2, 50, seed=4).detach(), _rand(1, 1, 50, 24, seed=5).detach()
    # a-side GQA (a on 1 head, b and c on 2), b-side row terms, φ' of x (on 1 head) applied to the output
    want = _scan_reference(a, b, c, reverse=reverse, eb=eb, x=x)
    assert _rel(lt.chunk_scan(a, b, c, add_b=eb, grad_x=x, **run), want) < TOL
    assert _rel(lt.chunk_scan(a, b, c, add_b=eb, grad_x=x, carry_sums=False, **run), want) > 1e-2
    # b-side GQA (a on 4 heads), a-side row terms, rows divided, from the states of the scan with b and c
    # swapped, read transposed, and its key sums as this scan's Σ c (how the dq scan uses the forward's)
    a2, ea = _rand(1, 4, 50, 24, seed=6).detach(), _rand(1, 4, 50, seed=7).detach()
    rdiv = _rand(1, 4, 50, seed=8).detach().abs() + 1.0
    _, _, fwd = lt.chunk_scan(_rand(1, 2, 50, 16, seed=9).detach(), b, c, normalize=True, eps=1.0,
                              return_states=True, **run)
    handed = lt.Carried(fwd.states, None, fwd.zsums, transposed=True)
    want2 = _scan_reference(a2, c, b, reverse=reverse, ea=ea, rdiv=rdiv)
    assert _rel(lt.chunk_scan(a2, c, b, add_a=ea, divide_rows=rdiv, carried=handed, **run), want2) < TOL
    assert _rel(lt.chunk_scan(a2, c, b, add_a=ea, divide_rows=rdiv, **run), want2) < TOL  # its own states
    dropped = lt.chunk_scan(a2, c, b, add_a=ea, divide_rows=rdiv, carried=handed, carry_sums=False, **run)
    assert _rel(dropped, want2) > 1e-2
    with pytest.raises(ValueError, match="carried states"):  # the same states not declared transposed
        lt.chunk_scan(a2, c, b, carried=handed._replace(transposed=False), **run)


# ---- the method --------------------------------------------------------------------------------------------
def _ctx(mask="causal", seq_q=20, seq_kv=20, params=None, device="cpu"):
    from attnbench import masks

    spec = masks.make_mask(mask)
    bound = spec.bind(seq_q, seq_kv)
    from types import SimpleNamespace

    case = SimpleNamespace(method="linear_attn_triton", batch=1, heads_q=2, heads_kv=2, seq_q=seq_q,
                           seq_kv=seq_kv, head_dim=16, seed=0, dtype="float32")
    return BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device(device),
                        dtype=torch.float32, options={}, params=dict(params or {}))


def test_without_cuda_or_interpreter_the_case_is_unsupported(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(Unsupported, match="TRITON_INTERPRET=1"):
        METHODS["linear_attn_triton"].build(_ctx())


def test_cross_attention_is_unsupported():
    with pytest.raises(Unsupported, match="causal self-attention only"):
        METHODS["linear_attn_triton"].build(_ctx(seq_q=8, seq_kv=20))


@pytest.mark.parametrize("params,field", [({"chunk": 48}, "chunk"), ({"chunk": 8}, "chunk"),
                                          ({"block_v": 0}, "block_v"), ({"num_warps": 3}, "num_warps"), ({"seg_chunks": 0}, "seg_chunks"),
                                          ({"feature_map": "elu"}, "feature_map")])
def test_bad_hyper_parameters_name_the_field(params, field):
    with pytest.raises(ValueError, match=f"method_options.linear_attn_triton.{field}"):
        METHODS["linear_attn_triton"].build(_ctx(params=params))


@interp
def test_method_equals_linear_attn():
    fast = as_prepared(METHODS["linear_attn_triton"].build(_ctx(params={"chunk": 16, "block_v": 16})))
    q, k, v = (_rand(1, 2, 20, 16, seed=s).detach() for s in (1, 2, 3))
    assert _rel(fast.fn(q, k, v), fast.reference(q, k, v)) < 1e-5


@interp
def test_harness_rows(cfg):
    """Through the case runner (gate included): fp32 fwd_bwd at a length that is not a multiple of the
    chunk is ok; the full mask is unsupported (causal only)."""
    cfg.update(methods=["linear_attn_triton"], masks=["causal", "full"], seq_lens=[20], modes=["fwd_bwd"],
               head_dim=16, method_options={"linear_attn_triton": {"chunk": 16, "block_v": 16}})
    frame = sweep_rows(cfg).set_index("mask")
    assert frame.loc["causal", "status"] == "ok", frame.loc["causal", "reason"]
    assert frame.loc["full", "status"] == "unsupported"


# ---- impl: triton of the kernelised methods (performer, cosFormer: their features through the scan) ---------
def _kernelized_ctx(method, params, mask="causal", seq_q=70, seq_kv=70, dtype="float32", mode="fwd_bwd",
                    heads=2, kv_heads=1, dim=16):
    from types import SimpleNamespace

    from attnbench import masks

    bound = masks.make_mask(mask).bind(seq_q, seq_kv)
    case = SimpleNamespace(method=method, batch=1, heads_q=heads, heads_kv=kv_heads, seq_q=seq_q, seq_kv=seq_kv,
                           head_dim=dim, seed=0, dtype=dtype, mode=mode)
    return BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                        dtype=getattr(torch, dtype), options={}, params=dict(params))


# performer with m = 24 features (not a power of two, not the head dim 16); cosFormer's 2d = 32; linear_attn's
# elu+1 (m = 16); rfa's 2D = 64 sin/cos features at its defaults (floor 1e-3, sigma 1: the floor holds on no row
# of these inputs; the floor's own tests are below)
KERNELIZED = {"performer": {"features": 24}, "cosformer": {}, "linear_attn": {}, "rfa": {}}
TRITON_RUN = {"impl": "triton", "chunk": 16, "block_v": 16, "seg_chunks": 2}  # 70 tokens: 5 chunks, 3 segments


def _impl_errors(method, dtype, params, shared=None):
    """rel errors (out, dq, dk, dv) of ``method`` built with ``params`` on bf16/fp32 inputs against (a) the
    method's own reference in fp32 on the same inputs and (b) impl chunked (fp32 inputs); GQA 2 on 1 heads.
    ``shared``: options of the method given to both builds (e.g. rfa's sigma)."""
    base = {**KERNELIZED[method], **(shared or {})}
    fast = as_prepared(METHODS[method].build(_kernelized_ctx(method, {**base, **params},
                                                             dtype=str(dtype).split(".")[1])))
    chunked = as_prepared(METHODS[method].build(_kernelized_ctx(method, {**base, "chunk": 16})))
    q = _rand(1, 2, 70, 16, seed=1, dtype=dtype)
    k, v = _rand(1, 1, 70, 16, seed=2, dtype=dtype), _rand(1, 1, 70, 16, seed=3, dtype=dtype)
    kw = fast.prepare(q, k, v) if fast.prepare else {}
    out = fast.fn(q, k, v, **kw)
    dout = _rand(*out.shape, seed=9).detach()
    got = [out] + list(torch.autograd.grad(out, (q, k, v), dout.to(out.dtype)))
    errors = {}
    for name, form in (("reference", chunked.reference), ("chunked", chunked.fn)):
        wide = [t.detach().float().requires_grad_() for t in (q, k, v)]
        want = form(*wide, **kw)
        want = [want] + list(torch.autograd.grad(want, wide, dout))
        errors[name] = [_rel(g, w) for g, w in zip(got, want)]
    return errors


@interp
@pytest.mark.parametrize("method", list(KERNELIZED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernelized_triton_matches_chunked_and_reference(method, dtype):
    """impl triton's values and gradients (q, k, v) equal impl chunked's and the method's own reference: fp32
    to rounding, bf16 within the harness's gate (measured: out 0.0023-0.0026, gradients 0.0037-0.0061)."""
    out_tol, grad_tol = (1e-5, 1e-5) if dtype == torch.float32 else TOLERANCE["bfloat16"]
    for against, errors in _impl_errors(method, dtype, TRITON_RUN).items():
        assert errors[0] < out_tol and max(errors[1:]) < grad_tol, (against, errors)


@interp
@pytest.mark.parametrize("method", ["performer", "linear_attn"])
def test_kernelized_triton_negative_control_elu_on_top_of_the_features(monkeypatch, method):
    """The same comparison catches the scan applying elu+1 to the features it is given (feature_map
    'precomputed' instead of 'identity'; for linear_attn: elu+1 applied twice), far outside the bf16 gate."""
    lt = _kernels()
    honest = lt.linear_attn
    monkeypatch.setattr(lt, "linear_attn", lambda *a, **kw: honest(*a, **{**kw, "feature_map": "precomputed"}))
    errors = _impl_errors(method, torch.float32, TRITON_RUN)["reference"]
    assert min(errors) > 3 * TOLERANCE["bfloat16"][1], errors


@pytest.mark.parametrize("params,field", [({"impl": "fast"}, "impl"), ({"block_v": 32}, "block_v"),
                                          ({"feature_dtype": "float32"}, "feature_dtype"),
                                          ({"impl": "triton", "feature_dtype": "half"}, "feature_dtype"),
                                          ({"impl": "triton", "chunk": 48}, "chunk"),
                                          ({"impl": "triton", "compute_dtype": "bfloat16"}, "compute_dtype")])
def test_kernelized_impl_bad_options_name_the_field(params, field):
    for method in ("performer", "cosformer"):
        with pytest.raises(ValueError, match=f"method_options.{method}.{field}"):
            METHODS[method].build(_kernelized_ctx(method, params))


@pytest.mark.parametrize("method,params,build,why", [
    ("performer", {}, dict(mask="full"), "causal self-attention only"),
    ("cosformer", {}, dict(seq_q=20, seq_kv=70), "causal self-attention only"),
    ("performer", {}, dict(mode="decode", seq_q=1), "no decode step"),
    ("performer", {"features": 300}, {}, "feature width m 300"),
    ("cosformer", {}, dict(dim=160), "feature width m 320"),
    ("rfa", {"features": 160}, {}, "method_options.rfa.impl=triton: feature width m 320"),
])
def test_kernelized_triton_unsupported_cases_say_why(method, params, build, why):
    with pytest.raises(Unsupported, match=why):
        METHODS[method].build(_kernelized_ctx(method, {"impl": "triton", **params}, **build))


def test_kernelized_triton_without_cuda_or_interpreter_is_unsupported(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(Unsupported, match="TRITON_INTERPRET=1"):
        METHODS["cosformer"].build(_kernelized_ctx("cosformer", {"impl": "triton"}))


@interp
def test_kernelized_triton_harness_rows(cfg):
    """Through the case runner (gate included), fp32 fwd_bwd at 20 tokens: performer, cosFormer and rfa with impl
    triton are ok on the causal mask and unsupported on the full one (causal only); decode is unsupported."""
    cfg.update(methods=["performer", "cosformer", "rfa"], masks=["causal", "full"], seq_lens=[20],
               modes=["fwd_bwd", "decode"], head_dim=16,
               method_options={"performer": {**TRITON_RUN, "features": 24}, "cosformer": TRITON_RUN,
                               "rfa": TRITON_RUN})
    frame = sweep_rows(cfg)
    rows = frame.set_index(["method", "mask", "mode"])
    for method in ("performer", "cosformer", "rfa"):
        assert rows.loc[(method, "causal", "fwd_bwd"), "status"] == "ok", rows.loc[(method, "causal", "fwd_bwd"), "reason"]
        assert rows.loc[(method, "full", "fwd_bwd"), "status"] == "unsupported"
        decode = rows.loc[(method, "causal", "decode")]
        assert decode["status"] == "unsupported" and "impl=triton" in decode["reason"], decode["reason"]


# ---- rfa's denominator floor in the scan: max(Σ φq·φk, floor) + eps, no gradient to the sum where it holds ---
RFA_FLOORED = {"sigma": 0.5}  # narrow kernels: the sin/cos estimates of Σ φq·φk go negative on early rows


def _rfa_floored_rows(shared) -> int:
    """Rows of ``_impl_errors``'s rfa inputs (fp32) whose sum Σ_{j<=i} φq_i·φk_j lies below rfa's floor."""
    from attnbench.methods.linear.rfa import rfa_features

    ctx = _kernelized_ctx("rfa", {**KERNELIZED["rfa"], **shared})
    prepared = as_prepared(METHODS["rfa"].build(ctx))
    q, k, v = _rand(1, 2, 70, 16, seed=1), _rand(1, 1, 70, 16, seed=2), _rand(1, 1, 70, 16, seed=3)
    omega = prepared.prepare(q, k, v)["omega"]
    fq, fk = rfa_features(q.detach(), omega), rfa_features(k.detach(), omega)
    sums = (fq @ fk.transpose(-1, -2)).tril().sum(-1)
    return int((sums < ctx.param("floor", 1e-3)).sum())


@interp
def test_rfa_triton_bf16_near_the_floor_with_float32_features():
    """bf16 inputs where rfa's floor holds: with ``feature_dtype: float32`` (features, values and the scan in fp32)
    impl triton is within the bf16 gate against the own reference and the chunked form; with the default bf16
    features it is not (dq / dk: the features' bf16 rounding divided by a denominator near the floor), which is
    what the option is for (the chunked form computes its features in fp32 and passes on these inputs too)."""
    assert _rfa_floored_rows(RFA_FLOORED) >= 10
    out_tol, grad_tol = TOLERANCE["bfloat16"]
    wide = _impl_errors("rfa", torch.bfloat16, {**TRITON_RUN, "feature_dtype": "float32"}, RFA_FLOORED)
    for against, errors in wide.items():
        assert errors[0] < out_tol and max(errors[1:]) < grad_tol, (against, errors)
    narrow = _impl_errors("rfa", torch.bfloat16, TRITON_RUN, RFA_FLOORED)["reference"]
    assert max(narrow[1:3]) > grad_tol, narrow


@interp
def test_rfa_triton_with_the_floor_active_matches_chunked_and_reference():
    """rfa impl triton where the floor holds (20 of 140 rows here, checked): values, dq, dk, dv equal impl chunked's
    and the own reference's in fp32 (measured 1.5e-6). (bf16 on these inputs: dq, dk off by ~0.03, the bf16
    rounding of the features amplified by 1/floor on the floored rows and rows near the floor; the floor in bf16
    is held to the gate on constructed features below.)"""
    assert _rfa_floored_rows(RFA_FLOORED) >= 10
    for against, errors in _impl_errors("rfa", torch.float32, TRITON_RUN, RFA_FLOORED).items():
        assert max(errors) < 1e-5, (against, errors)


@interp
def test_rfa_triton_negative_control_scan_without_the_floor(monkeypatch):
    """The comparison above catches the method's scan called without the floor (kernelized not passing it)."""
    lt = _kernels()
    honest = lt.linear_attn
    monkeypatch.setattr(lt, "linear_attn", lambda *a, **kw: honest(*a, **{**kw, "floor": None}))
    errors = _impl_errors("rfa", torch.float32, TRITON_RUN, RFA_FLOORED)["reference"]
    assert min(errors) > 3 * TOLERANCE["bfloat16"][1], errors


def _floored_features(dtype, seq=70, m=24, dv=16):
    """Features whose row sums Σ_{j<=i} φq_i·φk_j are about ±(i+1): negative (floored) on every third row, with
    a margin of ~0.9 from the floor everywhere (so rounding cannot move a row across it); m = 24 is padded."""
    gen = torch.Generator().manual_seed(4)
    axis = torch.randn(m, generator=gen)
    axis = axis / axis.norm()
    sign = torch.where(torch.arange(seq) % 3 == 1, -1.0, 1.0)
    fq = sign[:, None] * axis + 0.1 * torch.randn(1, 2, seq, m, generator=gen)
    fk = axis + 0.1 * torch.randn(1, 2, seq, m, generator=gen)
    return fq.to(dtype).requires_grad_(), fk.to(dtype).requires_grad_(), _rand(1, 2, seq, dv, seed=3, dtype=dtype)


def _floor_errors(dtype, **broken):
    """rel errors (out, d fq, d fk, dv) of the scan with rfa's floor 1e-3 on :func:`_floored_features` against
    naive_linear's floor (fp32, on the same rounded features): 5 chunks in 3 segments."""
    lt = _kernels()
    fq, fk, v = _floored_features(dtype)
    sums = (fq.detach().float() @ fk.detach().float().transpose(-1, -2)).tril().sum(-1)
    assert int((sums < 1e-3).sum()) >= 40 and float((sums - 1e-3).abs().min()) > 0.5  # the input does its job
    out = lt.linear_attn(fq, fk, v, chunk=16, block_v=16, seg_chunks=2, feature_map="identity",
                         **{"floor": 1e-3, **broken})
    dout = _rand(*out.shape, seed=9).detach()
    got = [out] + list(torch.autograd.grad(out, (fq, fk, v), dout.to(out.dtype)))
    wide = [t.detach().float().requires_grad_() for t in (fq, fk, v)]
    ref = common.naive_linear(*wide, causal=True, offset=0, eps=1e-6, floor=1e-3)
    want = [ref] + list(torch.autograd.grad(ref, wide, dout))
    return [_rel(g, w) for g, w in zip(got, want)]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_floor_kernel_matches_reference_where_the_floor_holds(dtype):
    """The scan's floor (forward: max(Σ, floor) + eps; backward: no gradient to Σ on floored rows) equals
    autograd of naive_linear's clamp_min: fp32 to rounding (measured 1.9e-7), bf16 within the harness's gate
    (measured out 0.0018, gradients 0.0027-0.0036)."""
    out_tol, grad_tol = (1e-5, 1e-5) if dtype == torch.float32 else TOLERANCE["bfloat16"]
    errors = _floor_errors(dtype)
    assert errors[0] < out_tol and max(errors[1:]) < grad_tol, errors


@interp
@pytest.mark.parametrize("broken", [{"floor": None}, {"floor": 0.0}, {"floor_grad": False}])
def test_floor_kernel_negative_controls(broken):
    """Caught on the floored rows: no floor, floor 0 instead of rfa's 1e-3 (values and all gradients off), and
    the backward passing the denominator's gradient through the floor (dq, dk off by orders of magnitude)."""
    errors = _floor_errors(torch.float32, **broken)
    assert max(errors) > 100 * TOLERANCE["bfloat16"][1], errors
    if "floor_grad" in broken:
        assert min(errors[1:3]) > 100 * TOLERANCE["bfloat16"][1], errors
