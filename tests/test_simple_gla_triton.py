"""simple_gla_triton (methods/linear/gla_triton.py, builder in gated_delta.py) on the CPU through Triton's
interpreter: values and gradients (q, k, v and the gate g) against simple_gla's fp32 token loop in fp32 and
bf16, lengths that are not a multiple of the chunk, the reverse scan, the causal leak probe, negative
controls (the carried state not decayed), the harness rows and the refusal without CUDA or interpreter.

bf16 bounds are looser than the harness's gate: Triton 3.6's interpreter rounds fp32 -> bf16 toward zero (see
tests/test_linear_triton.py); the GPU test (tests/test_linear_gpu.py) holds the kernel to the gate.

As in tests/test_linear_triton.py, TRITON_INTERPRET=1 must be set before triton is first imported, so unless
pytest itself was started with it, the tests here skip and tests/test_triton_interpreter.py runs this file (with
tests/test_linear_triton.py) in one child pytest with TRITON_INTERPRET=1.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from interpmark import INTERPRETING, interp, sweep_rows  # noqa: E402

from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared  # noqa: E402
from attnbench.methods.linear.gated_delta import chunked, naive_recurrence  # noqa: E402
from attnbench.methods.registry import Unsupported  # noqa: E402

METHOD = "simple_gla_triton"


def _kernels():
    from attnbench.methods.linear import gla_triton

    return gla_triton


def _rand(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()


def _gate(*shape, seed=0, mild=False):
    """log-decays: logsigmoid of normal draws (the harness's init), or mild ones (-0.1 ... 0, so that the
    state carries across several chunks and a missing decay shows)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    g = -0.1 * torch.rand(*shape, generator=gen) if mild else F.logsigmoid(x)
    return g.requires_grad_()


def _reference(q, k, v, g):
    return naive_recurrence(q, k, v, g, gated=True, delta=False, normalize=False)


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _errors(fn, q, k, v, g, seed=9):
    """rel errors of (out, dq, dk, dv, dg) of ``fn`` against the fp32 reference on the same (rounded) inputs."""
    out = fn(q, k, v, g)
    dout = _rand(*out.shape, seed=seed)
    got = torch.autograd.grad(out, (q, k, v, g), dout.to(out.dtype))
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v, g)]
    want = torch.autograd.grad(_reference(*ref_in), ref_in, dout)
    return [_rel(out, _reference(*ref_in))] + [_rel(a, b) for a, b in zip(got, want)]


# seq 37: not a multiple of the chunk (masked tail chunk); head dim 8: padded to 16 in registers; dv 24 with
# block_v 16: two value blocks, the second partial; seq 12 < chunk 32: a single partial chunk
@interp
# seg_chunks 1 / 2 with seq 37, 70: several segments run in parallel from the state kernel's states (the
# last one partial); seg_chunks 4 at seq 37: one segment (no state kernel)
@pytest.mark.parametrize("seq,dk,dv,chunk,mild,seg", [(37, 16, 16, 16, False, 4), (37, 8, 24, 16, True, 1),
                                                      (12, 16, 16, 32, False, 4), (70, 16, 16, 16, True, 2)])
def test_kernel_matches_reference_fp32_values_and_grads(seq, dk, dv, chunk, mild, seg):
    gt = _kernels()
    q, k, v = _rand(2, 2, seq, dk, seed=1), _rand(2, 2, seq, dk, seed=2), _rand(2, 2, seq, dv, seed=3)
    g = _gate(2, 2, seq, seed=4, mild=mild)
    errors = _errors(lambda *a: gt.simple_gla(*a, chunk=chunk, block_v=16, seg_chunks=seg), q, k, v, g)
    assert max(errors) < 1e-5, errors


@interp
def test_negative_controls_of_the_segment_hand_over_are_caught():
    """segments started from a zero state (carry=False) break the output and every gradient; the gate
    gradient without its closed-form segment tails (boundary=False) breaks dg only."""
    gt = _kernels()
    q, k, v = (_rand(1, 2, 70, 16, seed=s) for s in (1, 2, 3))
    g = _gate(1, 2, 70, seed=4, mild=True)
    errors = _errors(lambda *a: gt.simple_gla(*a, chunk=16, block_v=16, seg_chunks=1, carry=False), q, k, v, g)
    assert min(errors) > 5e-2, errors
    errors = _errors(lambda *a: gt.simple_gla(*a, chunk=16, block_v=16, seg_chunks=1, boundary=False), q, k, v, g)
    assert max(errors[:4]) < 1e-5 and errors[4] > 5e-2, errors


@interp
def test_gate_gradient_error_does_not_grow_with_length_bf16():
    """H200 rows had dg rel_err 0.021 (8K) ... 0.077 (128K) > 0.009: dg_t = Σ_{s>=t} (q_s·dq_s − k_s·dk_s) as
    one sequence-long reverse cumulative sum adds up the bf16-level errors of terms that cancel to a small
    result, so its error grows like √T. gate_grad sums only inside segments and adds each segment's tail in
    closed form from the states (⟨S_fwd, S_rev⟩). Here, on the same dq, dk (the kernels' fp32 outputs on
    bf16 inputs, 4096 tokens): the segmented dg is inside the harness's bf16 gradient tolerance and the
    global cumulative sum (the former code: the negative control) is not."""
    from attnbench.measure.gate import TOLERANCE, rel_error

    gt = _kernels()
    seq, dim = 4096, 32
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 1, seq, dim, generator=gen).to(torch.bfloat16) for _ in range(4))
    g = F.logsigmoid(torch.randn(1, 1, seq, generator=gen))
    scale = dim ** -0.5
    opts = dict(chunk=64, block_v=32, scale=scale, out_dtype=torch.float32, seg_chunks=4)
    dq, s_dq = gt.gated_scan(do, v, k, g, return_states=True, **opts)
    dk, s_dk = gt.gated_scan(v, do, q, g, reverse=True, return_states=True, **opts)
    db = (q.float() * dq).sum(-1) - (k.float() * dk).sum(-1)
    ref_in = [t.float().requires_grad_() for t in (q, k, v, g)]
    want = torch.autograd.grad(chunked(*ref_in, chunk=32, gated=True, delta=False, normalize=False), ref_in[3],
                               do.float())[0]
    tol = TOLERANCE["bfloat16"][1]
    fixed = rel_error(gt.gate_grad(db, s_dq, s_dk, scale=scale, seg_len=256), want)
    global_sum = rel_error(db.flip(-1).cumsum(-1).flip(-1), want)
    assert fixed < tol < global_sum, (fixed, global_sum)


@interp
def test_kernel_matches_reference_bf16_values_and_grads():
    gt = _kernels()
    q, k, v = (_rand(1, 2, 45, 32, seed=s, dtype=torch.bfloat16) for s in (4, 5, 6))
    g = _gate(1, 2, 45, seed=7, mild=True)
    errors = _errors(lambda *a: gt.simple_gla(*a, chunk=16, block_v=16, seg_chunks=1), q, k, v, g)
    assert max(errors) < 2e-2, errors
    broken = _errors(lambda *a: gt.simple_gla(*a, chunk=16, block_v=16, decay_state=False), q, k, v, g)
    assert broken[0] > 5e-2, broken  # the negative control is far outside the bf16 bound


@interp
def test_negative_control_undecayed_state_is_caught():
    gt = _kernels()
    q, k, v = (_rand(1, 2, 37, 16, seed=s) for s in (1, 2, 3))
    g = _gate(1, 2, 37, seed=4, mild=True)
    errors = _errors(lambda *a: gt.simple_gla(*a, chunk=16, block_v=16, decay_state=False), q, k, v, g)
    assert min(errors) > 5e-2, errors  # out and every gradient (dg included) far off


@interp
def test_reverse_scan_is_the_flipped_causal_scan():
    """reverse: o_i = Σ_{j>=i} e^(b_j − b_i) ...: in flipped time the same causal scan with the gates shifted
    by one (e^(b_j − b_i) = Π_{i<t<=j} e^(g_t))."""
    gt = _kernels()
    a, b, c = (_rand(1, 2, 29, 16, seed=s).detach() for s in (1, 2, 3))
    g = _gate(1, 2, 29, seed=4, mild=True).detach()
    rev = gt.gated_scan(a, b, c, g, chunk=16, block_v=16, reverse=True)
    shifted = torch.cat([g.new_zeros(1, 2, 1), g.flip(2)[..., :-1]], dim=2)
    flip = gt.gated_scan(a.flip(2), b.flip(2), c.flip(2), shifted, chunk=16, block_v=16).flip(2)
    assert _rel(rev, flip) < 1e-6


@interp
def test_strong_decays_stay_finite():
    """Log-decays of -4 per token over 40 tokens: a global cumulative sum would reach exp(-160) (0 in fp32) and
    its ratios 0/0; chunk-local differences keep every factor in [0, 1]. (The gate gradient ``q·dq − k·dk``
    cancels to its small true value here, so its relative error is larger: bounded at 1e-4.)"""
    gt = _kernels()
    q, k, v = (_rand(1, 1, 40, 16, seed=s) for s in (1, 2, 3))
    g = torch.full((1, 1, 40), -4.0, requires_grad=True)
    errors = _errors(lambda *a: gt.simple_gla(*a, chunk=16, block_v=16), q, k, v, g)
    assert max(errors[:4]) < 1e-5 and errors[4] < 1e-4, errors


def _leaks(fn, seq=37, dim=16, split=20):
    q, k, v = (_rand(1, 2, seq, dim, seed=s).detach() for s in (4, 5, 6))
    g = _gate(1, 2, seq, seed=9, mild=True).detach()
    k2, v2, g2 = k.clone(), v.clone(), g.clone()
    k2[:, :, split:] = _rand(1, 2, seq - split, dim, seed=7).detach() * 3
    v2[:, :, split:] = _rand(1, 2, seq - split, dim, seed=8).detach() * 3
    g2[:, :, split:] = -2.0
    base, moved = fn(q, k, v, g), fn(q, k2, v2, g2)
    return not torch.allclose(base[:, :, :split], moved[:, :, :split], atol=1e-6)


@interp
def test_kernel_does_not_leak_and_the_probe_catches_a_leaky_form():
    gt = _kernels()
    assert not _leaks(lambda *a: gt.simple_gla(*a, chunk=16, block_v=16))

    def leaky(q, k, v, g):  # the reverse (anti-causal) scan: every output sees the future
        return gt.gated_scan(q, k, v, g, chunk=16, block_v=16, reverse=True)

    assert _leaks(leaky)


# ---- the method --------------------------------------------------------------------------------------------
def _ctx(mask="causal", seq_q=20, seq_kv=20, params=None, device="cpu"):
    from attnbench import masks

    spec = masks.make_mask(mask)
    bound = spec.bind(seq_q, seq_kv)
    case = SimpleNamespace(method=METHOD, batch=1, heads_q=2, heads_kv=2, seq_q=seq_q, seq_kv=seq_kv, head_dim=16,
                           seed=0, dtype="float32")
    return BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device(device),
                        dtype=torch.float32, options={}, params=dict(params or {}))


def test_without_cuda_or_interpreter_the_case_is_unsupported(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(Unsupported, match="TRITON_INTERPRET=1"):
        METHODS[METHOD].build(_ctx())


def test_cross_attention_is_unsupported():
    with pytest.raises(Unsupported, match="causal self-attention only"):
        METHODS[METHOD].build(_ctx(seq_q=8, seq_kv=20))


@pytest.mark.parametrize("params,field", [({"chunk": 48}, "chunk"), ({"chunk": 8}, "chunk"),
                                          ({"block_v": 0}, "block_v"), ({"num_warps": 3}, "num_warps"), ({"seg_chunks": 0}, "seg_chunks"),
                                          ({"reference_naive_max_len": 0}, "reference_naive_max_len")])
def test_bad_hyper_parameters_name_the_field(params, field):
    with pytest.raises(ValueError, match=f"method_options.{METHOD}.{field}"):
        METHODS[METHOD].build(_ctx(params=params))


@interp
@pytest.mark.parametrize("naive_max", [4096, 8])  # 8: the reference is simple_gla's chunked form
def test_method_equals_simple_gla(naive_max):
    fast = as_prepared(METHODS[METHOD].build(_ctx(params={"chunk": 16, "block_v": 16,
                                                           "reference_naive_max_len": naive_max})))
    assert set(fast.extras) == {"g"}
    q, k, v = (_rand(1, 2, 20, 16, seed=s).detach() for s in (1, 2, 3))
    g = _gate(1, 2, 20, seed=4).detach()
    assert _rel(fast.fn(q, k, v, g), fast.reference(q, k, v, g)) < 1e-5
    simple = as_prepared(METHODS["simple_gla"].build(_ctx(params={"chunk": 16})))
    assert _rel(fast.fn(q, k, v, g), simple.reference(q, k, v, g)) < 1e-5


@interp
def test_harness_rows(cfg):
    """Through the case runner (gate included, gate gradients too): fp32 fwd_bwd at a length that is not a
    multiple of the chunk is ok; the full mask is unsupported (causal only)."""
    cfg.update(methods=[METHOD], masks=["causal", "full"], seq_lens=[20], modes=["fwd_bwd"], head_dim=16,
               method_options={METHOD: {"chunk": 16, "block_v": 16}})
    frame = sweep_rows(cfg).set_index("mask")
    assert frame.loc["causal", "status"] == "ok", frame.loc["causal", "reason"]
    assert frame.loc["full", "status"] == "unsupported"
