"""linear_attn_triton (methods/linear/linear_triton.py) on the CPU through Triton's interpreter:
values and gradients against the readable reference in fp32 and bf16, lengths that are not a multiple of the chunk, GQA, the causal leak probe, negative
controls (the intra-chunk mask switched off), the harness rows and the refusal without CUDA or interpreter.

bf16 bounds are looser than the harness's gate: Triton 3.6's interpreter rounds fp32 -> bf16 toward zero (the
GPU rounds to nearest), which roughly doubles the error; the GPU test (tests/test_linear_gpu.py) holds the
kernel to the gate's bf16 tolerance.

TRITON_INTERPRET=1 must be set before triton is first imported, and setting it in the pytest process would
switch every later test to the interpreter. So, unless pytest itself was started with TRITON_INTERPRET=1, the
tests here skip and tests/test_triton_interpreter.py runs this file (with tests/test_simple_gla_triton.py) in one
child pytest with TRITON_INTERPRET=1, failing with the child's report when any test there fails. To run this
file alone: ``TRITON_INTERPRET=1 pytest tests/test_linear_triton.py``.
"""
from __future__ import annotations

import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
interp = pytest.mark.skipif(not INTERPRETING, reason="runs in the child pytest of tests/test_triton_interpreter.py")

from attnbench.execute.runner import run_sweep  # noqa: E402
from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared  # noqa: E402
from attnbench.methods.linear import common  # noqa: E402
from attnbench.methods.registry import Unsupported  # noqa: E402


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
def test_kernel_matches_reference_bf16_values_and_grads():
    lt = _kernels()
    q, k, v = (_rand(2, 2, 45, 32, seed=s, dtype=torch.bfloat16) for s in (4, 5, 6))
    errors = _errors(lambda a, b, c: lt.linear_attn(a, b, c, chunk=16, block_v=16, seg_chunks=2), q, k, v)
    assert max(errors) < 2e-2, errors
    broken = _errors(lambda a, b, c: lt.linear_attn(a, b, c, chunk=16, block_v=16, mask_intra=False), q, k, v)
    assert min(broken) > 5e-2, broken  # the negative control is far outside the bf16 bound


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
                                          ({"block_v": 0}, "block_v"), ({"num_warps": 3}, "num_warps"), ({"seg_chunks": 0}, "seg_chunks")])
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
    frame = pd.read_parquet(run_sweep(cfg, "test", show_progress=False) / "rows.parquet").set_index("mask")
    assert frame.loc["causal", "status"] == "ok", frame.loc["causal", "reason"]
    assert frame.loc["full", "status"] == "unsupported"
