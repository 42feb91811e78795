"""The linear family's sampled-rows references (``rows=``, methods/linear/common.py ``streamed_rows``): on a
long case the case runner gates a strided sample of query rows on the method's own reference, which then
streams the keys in chunks with the prefix state carried (at 1M tokens the full fp32 reference does not fit
on one GPU). Here: the rows form equals the full reference's rows for every covered method (first and last
rows, rows at streaming-chunk boundaries, cross and full masks), a stream that forgets to carry the state or
(gated) to decay it is caught, as is a delta-rule stream (``gated_delta.delta_rows``: the state run through
every token, carried between pieces) that resets its state, and a long case through the CaseRunner takes the
rows path (ok; a broken fast path is wrong there), also for fla's adapters in their ``bshd`` layout (fla
faked by own PyTorch forms: fla itself needs a GPU)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute import case as case_module
from attnbench.execute.case import CaseRunner, _accepts
from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared
from attnbench.methods.linear import common, gated_delta, linear_attn
from attnbench.methods.registry import Unsupported

STREAM = 7  # keys per streaming step in these tests: several chunks at 40 keys
TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False}


def _rand(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float()


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _build(method, mask, seq_q, seq_kv, params, heads=2, dim=8):
    spec = masks.make_mask(mask)
    bound = spec.bind(seq_q, seq_kv)
    case = SimpleNamespace(method=method, batch=2, heads_q=heads, heads_kv=heads, seq_q=seq_q, seq_kv=seq_kv,
                           head_dim=dim, seed=0, dtype="float32")
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                       dtype=torch.float32, options={}, params=dict(params))
    return as_prepared(METHODS[method].build(ctx))


def _inputs(prepared, seq_q, seq_kv, heads=2, dim=8):
    q, k, v = _rand(2, heads, seq_q, dim, seed=1), _rand(2, heads, seq_kv, dim, seed=2), _rand(2, heads, seq_kv, dim, seed=3)
    gen = torch.Generator().manual_seed(4)
    extras = {n: e.make(gen, "cpu", torch.float32) for n, e in prepared.extras.items()}
    if prepared.prepare:
        extras.update(prepared.prepare(q, k, v, **extras))
    return q, k, v, extras


def _boundary_rows(seq_q, seq_kv, full):
    """First and last rows and the rows whose last key opens or closes a streaming chunk."""
    offset = seq_kv - seq_q
    rows = {0, seq_q - 1}
    if not full:
        rows |= {i for i in range(seq_q) if (i + offset) % STREAM in (0, STREAM - 1)}
    return torch.tensor(sorted(rows))


CASES = [  # method, mask, seq_q, seq_kv
    ("linear_attn", "causal", 40, 40),
    ("linear_attn", "causal", 17, 40),  # bottom-right: keys before the first query form the initial state
    ("linear_attn", "full", 17, 40),
    ("performer", "causal", 40, 40),
    ("cosformer", "causal", 40, 40),  # position-dependent features: absolute positions per chunk
    ("cosformer", "causal", 17, 40),
    ("rfa", "causal", 40, 40),  # sin/cos features: the denominator floor
    ("simple_gla", "causal", 40, 40),  # gated
    ("simple_gla", "causal", 17, 40),
    ("linear_attn_triton", "causal", 40, 40),
    ("simple_gla_triton", "causal", 40, 40),
    ("delta_rule", "causal", 40, 40),  # the state run through every token, carried between pieces
    ("delta_rule", "causal", 17, 40),
    ("gated_delta_rule", "causal", 40, 40),
    ("gated_delta_rule", "causal", 17, 40),
]


@pytest.mark.parametrize("method, mask, seq_q, seq_kv", CASES, ids=[f"{m}-{k}-{q}x{s}" for m, k, q, s in CASES])
def test_rows_form_equals_the_full_reference_rows(monkeypatch, method, mask, seq_q, seq_kv):
    monkeypatch.setattr(linear_attn, "triton_runnable", lambda device: None)  # the reference alone runs here
    params = {"chunk": 16 if method.endswith("triton") else 4, "reference_stream_chunk": STREAM}
    if method == "performer":
        params["features"] = 16
    prepared = _build(method, mask, seq_q, seq_kv, params)
    assert _accepts(prepared.reference, "rows")
    q, k, v, extras = _inputs(prepared, seq_q, seq_kv)
    rows = _boundary_rows(seq_q, seq_kv, mask == "full")
    full = prepared.reference(q, k, v, **extras)  # the quadratic form (naive) at this size
    got = prepared.reference(q, k, v, rows=rows, **extras)
    assert got.shape == (2, 2, len(rows), 8) and got.dtype == torch.float32
    assert _rel(got, full[:, :, rows]) < 1e-5


def test_the_delta_rules_take_rows_and_refuse_a_bad_stream():
    for method in ("delta_rule", "gated_delta_rule"):
        assert _accepts(_build(method, "causal", 20, 20, {"chunk": 4}).reference, "rows")
    q = _rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="stream"):
        gated_delta.delta_rows(q, q, q, None, None, torch.tensor([0]), gated=False, chunk=2, stream=0)
    with pytest.raises(Unsupported, match="seq_q"):
        gated_delta.delta_rows(_rand(1, 1, 6, 4), q, q, None, None, torch.tensor([0]), gated=False, chunk=2)


def test_streamed_rows_without_keys_are_zero_and_a_bad_chunk_is_refused():
    fq, fk, v = _rand(1, 1, 3, 4).abs(), _rand(1, 1, 9, 4).abs(), _rand(1, 1, 9, 4)
    out = common.streamed_rows(fq, lambda a, b: (fk[:, :, a:b], v[:, :, a:b], None), 9, torch.tensor([-2, 0, 8]),
                               chunk=4, eps=0.0)
    assert torch.equal(out[:, :, 0], torch.zeros(1, 1, 4))
    assert torch.allclose(out[:, :, 1], v[:, :, 0])  # one visible key: its value
    with pytest.raises(ValueError, match="chunk"):
        common.streamed_rows(fq, None, 9, torch.tensor([0]), chunk=0)


# ---- negative controls: a stream that forgets its state is caught -----------------------------------------------
def test_a_stream_that_forgets_to_carry_the_state_is_caught():
    prepared = _build("linear_attn", "causal", 40, 40, {"chunk": 4})
    q, k, v, _ = _inputs(prepared, 40, 40)
    rows = _boundary_rows(40, 40, False)
    want = prepared.reference(q, k, v)[:, :, rows]
    fq, _, _ = linear_attn.elu_features(q[:, :, rows], k[:, :, :0], v[:, :, :0])

    def keys(start, stop):
        _, fk, vv = linear_attn.elu_features(q[:, :, :0], k[:, :, start:stop], v[:, :, start:stop])
        return fk, vv, None

    def stream(**broken):
        return common.streamed_rows(fq, keys, 40, rows, chunk=STREAM, eps=1e-6, **broken)

    assert _rel(stream(), want) < 1e-5
    assert _rel(stream(carry=False), want) > 1e-2


def test_a_gated_stream_that_forgets_the_state_or_its_decay_is_caught():
    prepared = _build("simple_gla", "causal", 40, 40, {"chunk": 4})
    q, k, v, extras = _inputs(prepared, 40, 40)
    g = F.logsigmoid(_rand(2, 2, 40, seed=5) + 3.0)  # mild decays: the carried state matters
    rows = _boundary_rows(40, 40, False)
    want = prepared.reference(q, k, v, g)[:, :, rows]
    scale = 8 ** -0.5

    def stream(**broken):
        keys = lambda a, b: (k[:, :, a:b], v[:, :, a:b], g[:, :, a:b])  # noqa: E731
        return scale * common.streamed_rows(q[:, :, rows], keys, 40, rows, chunk=STREAM, normalize=False,
                                            **broken)

    assert _rel(stream(), want) < 1e-5
    assert _rel(gated_delta.gated_rows(q, k, v, g, rows, chunk=STREAM), want) < 1e-5
    assert _rel(stream(carry=False), want) > 1e-2
    assert _rel(stream(decay_state=False), want) > 1e-2


@pytest.mark.parametrize("name", ["delta_rule", "gated_delta_rule"])
def test_a_delta_stream_that_resets_the_state_is_caught(name):
    gated = gated_delta.VARIANTS[name][0]
    q, k, v = _rand(2, 2, 40, 8, seed=1), _rand(2, 2, 40, 8, seed=2), _rand(2, 2, 40, 8, seed=3)
    g = F.logsigmoid(_rand(2, 2, 40, seed=5) + 3.0)  # mild decays: the carried state matters
    beta = torch.sigmoid(_rand(2, 2, 40, seed=6))
    rows = _boundary_rows(40, 40, False)
    want = gated_delta.naive_recurrence(q, k, v, g, beta, gated=gated)[:, :, rows]
    got = gated_delta.delta_rows(q, k, v, g, beta, rows, gated=gated, chunk=4, stream=STREAM)
    assert _rel(got, want) < 1e-5
    broken = gated_delta.delta_rows(q, k, v, g, beta, rows, gated=gated, chunk=4, stream=STREAM, carry=False)
    assert _rel(broken, want) > 1e-2


# ---- through the case runner --------------------------------------------------------------------------------------
def _run(method, mode, opts, monkeypatch, seq=48):
    monkeypatch.setattr(case_module, "GATE_SAMPLE_ROWS", 9)  # a strided sample of the rows, first and last among them
    spec = masks.make_mask("causal")
    options = {"timing": TIMING, "ref_full_pairs": 1000, "method_options": {method: dict(opts)}}
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=seq,
                seq_kv=seq, head_dim=8, dtype="float32", mode=mode, seed=0)
    return CaseRunner("cpu", options).run(case)


@pytest.fixture
def streamed(monkeypatch):
    """The row counts :func:`common.streamed_rows` is called with (the rows reference ran when non-empty)."""
    calls = []
    original = common.streamed_rows

    def spy(fq, *a, **kw):
        calls.append(fq.shape[2])
        return original(fq, *a, **kw)

    original_delta = gated_delta.delta_rows

    def delta_spy(q, k, v, g, beta, rows, **kw):
        calls.append(rows.numel())
        return original_delta(q, k, v, g, beta, rows, **kw)

    monkeypatch.setattr(common, "streamed_rows", spy)
    monkeypatch.setattr(gated_delta, "streamed_rows", spy)
    monkeypatch.setattr(gated_delta, "delta_rows", delta_spy)
    return calls


@pytest.mark.parametrize("method, mode", [("linear_attn", "fwd_bwd"), ("simple_gla", "fwd"), ("performer", "fwd"),
                                          ("delta_rule", "fwd"), ("gated_delta_rule", "fwd_bwd")])
def test_a_long_case_is_gated_on_streamed_rows(monkeypatch, streamed, method, mode):
    calls = streamed
    opts = {"chunk": 8, "reference_stream_chunk": 16, **({"features": 16} if method == "performer" else {})}
    row = _run(method, mode, opts, monkeypatch)
    assert row["status"] == "ok", row["reason"]
    assert calls and all(count == 9 for count in calls)  # the reference ran on the 9 sampled rows only
    if mode == "fwd_bwd":
        assert "grads_not_gated" in (row["flags"] or "")
    assert row["rel_err"] < 1e-5


def test_a_broken_fast_path_is_wrong_on_the_rows_path(monkeypatch):
    fast = common.chunked_linear

    def late_rows_off(*a, **kw):  # rows past the first third 2 % off: the sample's later rows catch it
        out = fast(*a, **kw).clone()
        out[:, :, out.shape[2] // 3:] *= 1.02
        return out

    monkeypatch.setattr(common, "chunked_linear", late_rows_off)
    row = _run("linear_attn", "fwd", {"chunk": 8, "reference_stream_chunk": 16}, monkeypatch)
    assert row["status"] == "wrong" and "rel_err" in row["reason"]


# ---- fla's layout (bshd): the runner's rows path transposes the rows reference back -----------------------------
FLA = ["fla_linear_attn", "fla_simple_gla", "fla_delta_rule", "fla_gated_delta_rule"]

def _fake_fla(monkeypatch):
    """fla's four operators as own PyTorch forms in fla's layout, importable as fla would be, and
    the fla methods' capabilities opened to the CPU and float32: the adapters' references and the runner's
    bshd rows path run here (fla itself needs a GPU)."""
    import dataclasses
    import sys
    from types import ModuleType

    def t(x):
        return x.transpose(1, 2)

    def chunk_linear_attn(fq, fk, v, scale, normalize):
        return t(common.chunked_linear(t(fq), t(fk), t(v), causal=True, offset=0, eps=1e-6, chunk=8)), None

    def chunk_simple_gla(q, k, v, g):
        return t(gated_delta.chunked(t(q), t(k), t(v), t(g), gated=True, delta=False, normalize=False, chunk=8)), None

    def chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel):
        assert use_qk_l2norm_in_kernel
        return t(gated_delta.chunked(t(q), t(k), t(v), None, t(beta), gated=False, chunk=8)), None

    def chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel):
        assert use_qk_l2norm_in_kernel
        return t(gated_delta.chunked(t(q), t(k), t(v), t(g), t(beta), chunk=8)), None

    for name, attrs in (("fla", {}), ("fla.ops", {}), ("fla.ops.linear_attn", {"chunk_linear_attn": chunk_linear_attn}),
                        ("fla.ops.simple_gla", {"chunk_simple_gla": chunk_simple_gla}),
                        ("fla.ops.delta_rule", {"chunk_delta_rule": chunk_delta_rule}),
                        ("fla.ops.gated_delta_rule", {"chunk_gated_delta_rule": chunk_gated_delta_rule})):
        module = ModuleType(name)
        for key, value in attrs.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
    for method in FLA:
        spec = METHODS[method]
        caps = dataclasses.replace(spec.caps, devices=("cpu", "cuda"), requires=(), dtypes=("float32",))
        monkeypatch.setitem(METHODS, method, dataclasses.replace(spec, caps=caps))


@pytest.mark.parametrize("method", FLA)
def test_fla_rows_reference_is_the_own_rows_in_bshd(monkeypatch, method):
    _fake_fla(monkeypatch)
    prepared = _build(method, "causal", 40, 40, {"reference_stream_chunk": STREAM})
    q, k, v, extras = _inputs(prepared, 40, 40)
    q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, T, H, D]; gates g, beta are [B, T, H]
    rows = _boundary_rows(40, 40, False)
    full = prepared.reference(q, k, v, **extras)
    got = prepared.reference(q, k, v, rows=rows, **extras)
    assert got.shape == (2, len(rows), 2, 8)
    assert _rel(got, full[:, rows]) < 1e-5


@pytest.mark.parametrize("method", FLA)
def test_a_long_bshd_case_is_gated_on_streamed_rows(monkeypatch, streamed, method):
    import sys

    _fake_fla(monkeypatch)
    row = _run(method, "fwd", {"reference_stream_chunk": 16}, monkeypatch)
    assert row["status"] == "ok", row["reason"]
    assert streamed and all(count == 9 for count in streamed)  # the rows path, in fla's layout
    assert row["rel_err"] < 1e-5
    op = method.removeprefix("fla_")
    module, name = f"fla.ops.{op}", f"chunk_{op}"
    fast = getattr(sys.modules[module], name)

    def late_rows_off(*a, **kw):  # rows past the first third 2 % off (bshd)
        out = fast(*a, **kw)[0].clone()
        out[:, out.shape[1] // 3:] *= 1.02
        return out, None

    monkeypatch.setattr(sys.modules[module], name, late_rows_off)
    row = _run(method, "fwd", {"reference_stream_chunk": 16}, monkeypatch)
    assert row["status"] == "wrong" and "rel_err" in row["reason"]


@pytest.mark.parametrize("method", FLA)
def test_a_short_bshd_case_gates_its_gradients(monkeypatch, method):
    """fwd_bwd below ref_full_pairs: the own reference's gradients come from its output in the method's own layout
    (the H200 found ``grad_output [B, T, H, D]`` against an output already transposed to ``[B, H, T, D]``); a fast
    path whose forward is right but whose gradients are 1.5x is wrong."""
    import sys

    _fake_fla(monkeypatch)
    row = _run(method, "fwd_bwd", {}, monkeypatch, seq=16)
    assert row["status"] == "ok", row["reason"]
    assert "grads_not_gated" not in (row.get("flags") or "")
    op = method.removeprefix("fla_")
    module, name = f"fla.ops.{op}", f"chunk_{op}"
    fast = getattr(sys.modules[module], name)

    def gradient_off(*a, **kw):  # the same values, gradients scaled by 1.5
        out = fast(*a, **kw)[0]
        return out * 1.5 - out.detach() * 0.5, None

    monkeypatch.setattr(sys.modules[module], name, gradient_off)
    row = _run(method, "fwd_bwd", {}, monkeypatch, seq=16)
    assert row["status"] == "wrong" and "rel_err" in row["reason"]
