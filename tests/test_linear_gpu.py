"""The linear family on a CUDA GPU (pytest -m gpu; skipped without one): every own method and every fla-core
backend through the case runner in bf16 at 2K tokens, fwd and fwd_bwd; fla's refused gated backward on Hopper
with Triton < 3.7.1 must come back as `unsupported` with fla's reason, never as an error."""
from __future__ import annotations

import pytest
import torch

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute.case import CaseRunner
from attnbench.methods import METHODS

TIMING = {"budget_ms": 5, "warmup_ms": 1, "min_reps": 2, "max_reps": 3, "flush_l2": False, "cuda_graph": False,
          "telemetry": False}
OWN = ["linear_attn", "linear_attn_triton", "performer", "rfa", "cosformer", "softmax_rnn", "gated_delta_rule",
       "delta_rule", "simple_gla", "simple_gla_triton"]
FLA = ["fla_linear_attn", "fla_simple_gla", "fla_delta_rule", "fla_gated_delta_rule"]


def _run(method, mode, seq=2048, method_options=None):
    spec = masks.make_mask("causal")
    runner = CaseRunner("cuda:0", {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 33,
                                   "method_options": {method: dict(method_options or {})}})
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=4, heads_kv=4, seq_q=seq,
                seq_kv=seq, head_dim=128, dtype="bfloat16", mode=mode, device="cuda:0")
    return runner.run(case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", OWN)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_own_methods_pass_the_gate_in_bf16(method, mode):
    row = _run(method, mode)
    assert row["status"] == "ok", row["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", FLA)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_fla_backends_run_or_decline_with_fla_reason(method, mode):
    available, why = METHODS[method].availability()
    if not available:
        pytest.skip(why)
    row = _run(method, mode)
    if row["status"] == "unsupported":
        assert "produces incorrect results" in row["reason"], row["reason"]
        assert mode == "fwd_bwd" and method in ("fla_simple_gla", "fla_gated_delta_rule")
    else:
        assert row["status"] == "ok", row["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seq", [1000, 4096])
def test_linear_attn_triton_matches_fla_chunk_linear_attn(seq):
    """The own Triton kernel and fla's chunk_linear_attn compute the same operator (elu+1 features,
    normalised; fla's eps 1e-10 vs 1e-6): outputs and gradients agree within the bf16 gate, and both sit
    within it of the fp32 reference (seq 1000: a tail chunk)."""
    pytest.importorskip("fla")
    import torch.nn.functional as F
    from fla.ops.linear_attn import chunk_linear_attn

    from attnbench.measure.gate import TOLERANCE, rel_error
    from attnbench.methods.linear import common
    from attnbench.methods.linear.linear_triton import linear_attn

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, seq, 128, device="cuda", generator=gen).bfloat16().requires_grad_()
               for _ in range(3))
    dout = torch.randn(1, 4, seq, 128, device="cuda", generator=gen).bfloat16()
    out = linear_attn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def fla(q, k, v):  # fla's [B, T, H, D] layout
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        return chunk_linear_attn(F.elu(qt) + 1, F.elu(kt) + 1, vt, scale=1.0, normalize=True)[0].transpose(1, 2)

    fla_out = fla(q, k, v)
    fla_grads = torch.autograd.grad(fla_out, (q, k, v), dout)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = common.naive_linear(F.elu(ref_in[0]) + 1, F.elu(ref_in[1]) + 1, ref_in[2], causal=True, offset=0,
                              eps=1e-6)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    out_tol, grad_tol = TOLERANCE["bfloat16"]
    assert rel_error(out, ref) < out_tol and rel_error(out, fla_out) < out_tol
    for name, got, theirs, want in zip("qkv", grads, fla_grads, ref_grads):
        assert rel_error(got, want) < grad_tol, name
        assert rel_error(got, theirs) < 2 * grad_tol, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seq", [1000, 4096])
def test_simple_gla_triton_matches_the_reference_and_fla_chunk_simple_gla(seq):
    """The own Triton kernel of simple_gla's operator: output and gradients (q, k, v and the gate g) within
    the bf16 gate of the fp32 chunked form (seq 1000: a tail chunk); the output also within it of fla's
    chunk_simple_gla where fla imports (its forward; the gated backward is refused on Hopper with Triton 3.6)."""
    from attnbench.measure.gate import TOLERANCE, rel_error
    from attnbench.methods.linear.gated_delta import chunked
    from attnbench.methods.linear.gla_triton import simple_gla

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, seq, 128, device="cuda", generator=gen).bfloat16().requires_grad_()
               for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 4, seq, device="cuda", generator=gen)).requires_grad_()
    dout = torch.randn(1, 4, seq, 128, device="cuda", generator=gen).bfloat16()
    out = simple_gla(q, k, v, g)
    grads = torch.autograd.grad(out, (q, k, v, g), dout)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v, g)]
    ref = chunked(*ref_in, gated=True, delta=False, normalize=False, chunk=32)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    out_tol, grad_tol = TOLERANCE["bfloat16"]
    assert rel_error(out, ref) < out_tol
    for name, got, want in zip(("q", "k", "v", "g"), grads, ref_grads):
        assert rel_error(got, want) < grad_tol, name
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return
    with torch.no_grad():
        theirs = chunk_simple_gla(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                  v.transpose(1, 2).contiguous(), g=g.transpose(1, 2).contiguous())[0]
    assert rel_error(out, theirs.transpose(1, 2)) < out_tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("feature_map", ["precomputed", "fused"])
def test_linear_attn_triton_fwd_bwd_within_the_gate_with_gqa(feature_map):
    """The own kernel's forward and backward (dD terms folded into the scans, states handed between scans)
    at 4100 tokens (17 segments, a tail chunk), GQA 8 on 2, hd 128, bf16: output and gradients within the
    bf16 gate of the fp32 chunked form, for both feature maps. Negative control: the backward with the sums
    carried into each segment dropped (``carry_u=False``) fails the gate on dq and dk."""
    import torch.nn.functional as F

    from attnbench.measure.gate import TOLERANCE, rel_error
    from attnbench.methods.linear import common
    from attnbench.methods.linear.linear_triton import linear_attn

    gen = torch.Generator(device="cuda").manual_seed(1)
    seq, heads, kv_heads = 4100, 8, 2
    q = torch.randn(1, heads, seq, 128, device="cuda", generator=gen).bfloat16().requires_grad_()
    k, v = (torch.randn(1, kv_heads, seq, 128, device="cuda", generator=gen).bfloat16().requires_grad_()
            for _ in range(2))
    dout = torch.randn(1, heads, seq, 128, device="cuda", generator=gen).bfloat16()
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    group = heads // kv_heads
    ref = common.chunked_linear(F.elu(ref_in[0]) + 1, (F.elu(ref_in[1]) + 1).repeat_interleave(group, 1),
                                ref_in[2].repeat_interleave(group, 1), causal=True, offset=0, eps=1e-6, chunk=64)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    out_tol, grad_tol = TOLERANCE["bfloat16"]
    for carry_u in (True, False):
        out = linear_attn(q, k, v, feature_map=feature_map, carry_u=carry_u)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        errors = [rel_error(g, w) for g, w in zip(grads, ref_grads)]
        assert rel_error(out, ref) < out_tol
        if carry_u:
            assert max(errors) < grad_tol, errors
        else:
            assert errors[0] > grad_tol and errors[1] > grad_tol and errors[2] < grad_tol, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method,options", [("performer", {"features": 128}), ("cosformer", {}),
                                            ("rfa", {"features": 64})])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_kernelized_impl_triton_passes_the_gate_in_bf16(method, options, mode):
    """performer (m = 128), cosFormer (2d = 256 features) and rfa (2D = 128, its floor in the scan) with ``impl: triton`` (their PyTorch features
    through the own Triton scan) at 16K tokens, hd 128, bf16: ok through the case runner (the gate against
    the method's own fp32 reference, gradients included in fwd_bwd)."""
    row = _run(method, mode, seq=16384, method_options={**options, "impl": "triton"})
    assert row["status"] == "ok", row["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["gated_delta_rule", "delta_rule", "simple_gla"])
@pytest.mark.parametrize("options", [{}, {"dot_precision": "ieee", "block_v": 16, "num_warps": 8, "num_stages": 1},
                                     {"dot_precision": "bf16"}])
def test_delta_rules_with_the_triton_state_loop_pass_the_gate_in_bf16(method, options):
    """impl: triton (methods/linear/delta_triton.py) at its defaults (tf32 dots), the full-fp32 variant and bf16
    dots (the loop's and chunk_outputs'; the GPU's own bf16 conversion and MMA, which the CPU tests emulate):
    fwd_bwd rows ok against the method's fp32 reference (its gate), as the PyTorch loop's are."""
    row = _run(method, "fwd_bwd", method_options={"impl": "triton", **options})
    assert row["status"] == "ok", row["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["gated_delta_rule", "delta_rule"])
def test_delta_rule_defaults_run_the_fused_kernels_on_cuda_and_the_pytorch_path_still_passes(method):
    """The defaults (impl, solve, wy_precision: auto) on the H200 are the Triton loop, the fused WY kernel and tf32
    dots for bf16 (what the row's resolved_options names); the PyTorch path, no longer the default there, asked for
    explicitly, still passes the gate."""
    row = _run(method, "fwd_bwd")
    assert row["status"] == "ok", row["reason"]
    assert row["resolved_options"] == '{"impl": "triton", "solve": "fused", "wy_precision": "tf32"}'
    plain = _run(method, "fwd_bwd", method_options={"impl": "torch", "solve": "torch"})
    assert plain["status"] == "ok", plain["reason"]
    assert plain["resolved_options"] == '{"impl": "torch", "solve": "torch"}'
