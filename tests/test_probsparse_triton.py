"""probsparse's sparsity measurement as one Triton kernel (``method_options.probsparse.measure: triton``,
methods/sparse/probsparse_triton.py): equal to the readable PyTorch measurement (fp32, gathered keys) over shapes,
dtypes, strides and head dims wider than one register tile; its negative controls caught; through the method the
same routing and output; bad values refused naming the field; ``unsupported`` without CUDA or the interpreter.

As in tests/test_superlinear_search_triton.py, TRITON_INTERPRET=1 must be set before triton is first imported, so
unless pytest itself was started with it, the interpreter tests here skip and tests/test_triton_interpreter.py
runs this file in its child pytest (``TRITON_INTERPRET=1 pytest tests/test_probsparse_triton.py`` alone)."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

from interpmark import INTERPRETING, interp  # noqa: E402

from attnbench import masks  # noqa: E402
from attnbench.config.plan import Case  # noqa: E402
from attnbench.execute.case import CaseRunner  # noqa: E402
from attnbench.methods import METHODS, BuildContext, MaskInfo  # noqa: E402
from attnbench.methods.registry import Unsupported  # noqa: E402
from attnbench.methods.sparse import probsparse  # noqa: E402

TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False}


def _kernel():
    from attnbench.methods.sparse import probsparse_triton

    return probsparse_triton


def _inputs(batch, heads, seq_q, seq_kv, dim, n_samples, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_q, dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads, seq_kv, dim, generator=gen).to(dtype)
    samples = torch.randint(seq_kv, (seq_q, n_samples), generator=gen)
    return q, k, samples


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@interp
@pytest.mark.parametrize("shape", [
    (1, 2, 37, 53, 16, 5),  # Lq not a multiple of the block, cross lengths
    (2, 1, 64, 64, 32, 7),
    (1, 2, 130, 30, 80, 3),  # head dim not a power of two; more queries than keys
    (1, 1, 70, 90, 200, 4),  # head dim wider than one register tile (two chunks)
    (1, 3, 1, 40, 16, 6),  # one query
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_pytorch_measurement(shape, dtype):
    q, k, samples = _inputs(*shape, dtype=dtype)
    got = _kernel().measure(q, k, samples)
    want = probsparse.measurements(q, k, samples)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert _rel(got, want) < 1e-5


@interp
def test_kernel_reads_strided_inputs():
    q, k, samples = _inputs(1, 2, 48, 48, 16, 5)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, L, D] view of a [B, L, H, D] tensor
    ks = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qs.is_contiguous()
    assert _rel(_kernel().measure(qs, ks, samples.t().contiguous().t()), probsparse.measurements(q, k, samples)) < 1e-5


@interp
@pytest.mark.parametrize("fault", ["no_max", "first_sample"])
def test_a_broken_kernel_is_caught(fault):
    q, k, samples = _inputs(1, 2, 37, 53, 16, 5)
    assert _rel(_kernel().measure(q, k, samples, fault=fault), probsparse.measurements(q, k, samples)) > 1e-2


def _build(opts=None, seq=96, cross=None, device="cpu"):
    spec = masks.make_mask("full")
    seq_kv = cross or seq
    bound = spec.bind(seq, seq_kv)
    case = Case(method="probsparse", mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=seq,
                seq_kv=seq_kv, head_dim=16, dtype="float32", mode="fwd", seed=0)
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device(device),
                       dtype=torch.float32, options={}, params=dict(opts or {}))
    return METHODS["probsparse"].build(ctx)


@interp
@pytest.mark.parametrize("cross", [None, 160])
def test_the_method_with_measure_triton_routes_and_answers_as_torch(cross):
    gen = torch.Generator().manual_seed(3)
    seq_kv = cross or 96
    q = torch.randn(1, 2, 96, 16, generator=gen)
    k, v = (torch.randn(1, 2, seq_kv, 16, generator=gen) for _ in range(2))
    outs = {}
    for impl in ("torch", "triton"):
        prepared = _build({"measure": impl}, cross=cross)
        extra = prepared.prepare(q, k, v)
        outs[impl] = (prepared.phases["routing"](q, k, v, **extra), prepared.fn(q, k, v, **extra))
    assert torch.equal(outs["torch"][0], outs["triton"][0])  # the same active queries
    torch.testing.assert_close(outs["triton"][1], outs["torch"][1], rtol=0, atol=0)


@interp
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_a_harness_row_with_measure_triton_is_ok(mode):
    spec = masks.make_mask("full")
    options = {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32,
               "method_options": {"probsparse": {"measure": "triton"}}}
    case = Case(method="probsparse", mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=128,
                seq_kv=128, head_dim=16, dtype="float32", mode=mode, seed=0)
    row = CaseRunner("cpu", options).run(case)
    assert row["status"] == "ok", row["reason"]
    assert row["resolved_options"] == '{"measure": "triton"}'  # the row names the code path that ran


def test_auto_measure_is_the_kernel_on_cuda_and_pytorch_elsewhere(monkeypatch):
    """The default (auto) takes the kernel measured faster on the H200 (results/h200-probsparse-triton) on a CUDA
    device where it runs; on the CPU PyTorch, even with the interpreter (slow there); fn.resolved says which."""
    from attnbench.methods.linear import linear_attn

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _build().fn.resolved == {"measure": "torch"}
    monkeypatch.setattr(linear_attn, "triton_runnable", lambda device: "")
    assert _build(device="cuda").fn.resolved == {"measure": "triton"}
    monkeypatch.setattr(linear_attn, "triton_runnable", lambda device: "no triton")
    assert _build(device="cuda").fn.resolved == {"measure": "torch"}


@pytest.mark.parametrize("value", ["cuda", 1, None])
def test_a_bad_measure_names_the_field(value):
    with pytest.raises(ValueError, match=r"method_options\.probsparse\.measure"):
        _build({"measure": value})


def test_measure_triton_is_unsupported_off_cuda_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(Unsupported, match=r"method_options\.probsparse\.measure=triton: .*TRITON_INTERPRET=1"):
        _build({"measure": "triton"})


def test_a_measurement_without_samples_is_refused():
    q, k, _ = _inputs(1, 1, 8, 8, 16, 1)
    with pytest.raises(ValueError, match="at least one key"):
        _kernel().measure(q, k, torch.zeros(8, 0, dtype=torch.long))
