"""The linear family (methods/linear): forms agree (values and gradients), causality, seeded random
features, recurrent decode, hyper-parameter validation, and the harness rows."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from attnbench.execute.runner import run_sweep
from attnbench.methods import METHODS, BuildContext, MaskInfo
from attnbench.methods.linear import common, gated_delta, performer, softmax_rnn

PLUGIN = Path(__file__).resolve().parent / "plugins" / "linear_faulty.py"
OWN = ["linear_attn", "performer", "rfa", "cosformer", "softmax_rnn", "gated_delta_rule", "delta_rule",
       "simple_gla"]


def _rows(run_dir):
    return pd.read_parquet(run_dir / "rows.parquet")


def _rand(*shape, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float().requires_grad_(requires_grad)


def _grads(fn, *inputs):
    out = fn(*inputs)
    dout = _rand(*out.shape, seed=99)
    grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    return out.detach(), tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs))


def _close(a, b, tol=1e-5):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-12)) < tol


# ---- the harness ----------------------------------------------------------------------------------------------
def test_harness_rows_ok_with_decode_state(cfg):
    small = {"chunk": 8, "reference_naive_max_pairs": 1 << 20}
    cfg.update(methods=OWN, masks=["full", "causal"], seq_lens=[20], cross_lens=[[8, 20]],
               modes=["fwd_bwd", "decode"], heads_q=2, head_dim=8,
               method_options={**{m: dict(small) for m in ("linear_attn", "performer", "rfa", "cosformer")},
                               "softmax_rnn": {"block": 6}, "gated_delta_rule": {"chunk": 8},
                               "delta_rule": {"chunk": 8}, "simple_gla": {"chunk": 8},
                               "performer": {**small, "features": 32}})
    frame = _rows(run_sweep(cfg, "test", show_progress=False))
    causal_only = {"gated_delta_rule", "delta_rule", "simple_gla"}
    for _, row in frame.iterrows():
        if row.method in causal_only and row["mask"] == "full":
            assert row.status == "unsupported" and "causal masks only" in row.reason
        else:
            assert row.status == "ok", (row.method, row["mask"], row.mode, row.reason)
    decode = frame[(frame["mode"] == "decode") & (frame["mask"] == "causal")].set_index("method")
    d = 8
    # state bytes per sequence: heads x (m x dv + m) fp32 for the kernelised skeleton, heads x dk x dv for GDN
    assert decode.loc["linear_attn", "state_bytes"] == 2 * (d * d + d) * 4
    assert decode.loc["cosformer", "state_bytes"] == 2 * (2 * d * d + 2 * d) * 4
    assert decode.loc["performer", "state_bytes"] == 2 * (32 * d + 32) * 4
    assert decode.loc["gated_delta_rule", "state_bytes"] == 2 * d * d * 4
    assert pd.isna(decode.loc["softmax_rnn", "state_bytes"])  # decodes over the cache, no O(1) state
    ok = frame[frame.status == "ok"].set_index(["method", "mask", "mode", "seq_q"])
    # approx_err only where comparing with softmax means something
    assert ok.loc[("performer", "causal", "fwd_bwd", 20), "approx_err"] > 0
    assert pd.isna(ok.loc[("linear_attn", "causal", "fwd_bwd", 20), "approx_err"])
    assert "approx_err_na" in ok.loc[("gated_delta_rule", "causal", "fwd_bwd", 20), "flags"]


def test_harness_marks_a_broken_chunked_form_wrong(cfg):
    """Negative control: a chunked form that drops the inter-chunk state is caught by the gate."""
    cfg.update(plugins=[str(PLUGIN)], methods=["t_linear_no_state"], masks=["causal"], seq_lens=[16],
               modes=["fwd"], head_dim=8)
    row = _rows(run_sweep(cfg, "test", show_progress=False)).iloc[0]
    assert row.status == "wrong" and "rel_err" in row.reason


# ---- the kernelised skeleton -------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_q,seq_kv,chunk", [(13, 13, 4), (5, 13, 3), (13, 5, 4), (16, 16, 16), (9, 9, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_linear_matches_naive_values_and_grads(seq_q, seq_kv, chunk, normalize):
    fq = _rand(1, 2, seq_q, 6, seed=1).exp().requires_grad_()
    fk = _rand(1, 2, seq_kv, 6, seed=2).exp().requires_grad_()
    v = _rand(1, 2, seq_kv, 5, seed=3, requires_grad=True)
    offset = seq_kv - seq_q
    for causal in (True, False):
        want = _grads(lambda a, b, c: common.naive_linear(a, b, c, causal=causal, offset=offset, eps=1e-6,
                                                          normalize=normalize), fq, fk, v)
        got = _grads(lambda a, b, c: common.chunked_linear(a, b, c, causal=causal, offset=offset, eps=1e-6,
                                                           chunk=chunk, normalize=normalize), fq, fk, v)
        assert _close(got[0], want[0])
        assert all(_close(g, w) for g, w in zip(got[1], want[1]))


def test_chunked_linear_rows_without_keys_are_zero():
    fq, fk, v = _rand(1, 1, 8, 4).exp(), _rand(1, 1, 3, 4).exp(), _rand(1, 1, 3, 4)
    out = common.chunked_linear(fq, fk, v, causal=True, offset=-5, eps=1e-6, chunk=2)
    assert torch.all(out[:, :, :5] == 0) and torch.all(out[:, :, 5:].abs() > 0)


def _leaks(fn, seq=24, dim=8, split=10, **extras):
    """Change keys/values after position ``split``; do outputs before it move?"""
    q, k, v = _rand(1, 2, seq, dim, seed=4), _rand(1, 2, seq, dim, seed=5), _rand(1, 2, seq, dim, seed=6)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, split:] = _rand(1, 2, seq - split, dim, seed=7) * 3
    v2[:, :, split:] = _rand(1, 2, seq - split, dim, seed=8) * 3
    base, moved = fn(q, k, v, **extras), fn(q, k2, v2, **extras)
    return not torch.allclose(base[:, :, :split], moved[:, :, :split], atol=1e-6)


@pytest.mark.parametrize("method", ["linear_attn", "performer", "rfa", "cosformer", "softmax_rnn",
                                    "gated_delta_rule", "delta_rule", "simple_gla"])
def test_causal_forms_do_not_leak(method):
    params = {"block": 5} if method == "softmax_rnn" else {"chunk": 4}  # each method's own block option
    prepared = _build(method, "causal", 24, 24, params=params)
    extras = {n: e.make(torch.Generator().manual_seed(1), "cpu", torch.float32) for n, e in prepared.extras.items()}
    q, k, v = _rand(1, 2, 24, 8, seed=4), _rand(1, 2, 24, 8, seed=5), _rand(1, 2, 24, 8, seed=6)
    if prepared.prepare:
        extras.update(prepared.prepare(q, k, v, **extras))
    assert not _leaks(prepared.fn, **extras)
    assert not _leaks(prepared.reference, **extras)


def test_leak_probe_catches_an_inclusive_prefix_state():
    """Negative control of the probe: a causal form whose chunk state includes the chunk itself leaks."""

    def leaky(q, k, v):
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        return common.chunked_linear(fq, fk, v, causal=False, offset=0, eps=1e-6, chunk=4)

    assert _leaks(leaky)


# ---- builders, decode, hyper-parameters ----------------------------------------------------------------------
def _ctx(method, mask, seq_q, seq_kv, params=None, heads=2, dim=8, seed=0):
    from attnbench import masks

    spec = masks.make_mask(mask)
    bound = spec.bind(seq_q, seq_kv)
    case = SimpleNamespace(method=method, batch=1, heads_q=heads, heads_kv=heads, seq_q=seq_q, seq_kv=seq_kv,
                           head_dim=dim, seed=seed, dtype="float32")
    return BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                        dtype=torch.float32, options={}, params=dict(params or {}))


def _build(method, mask, seq_q, seq_kv, params=None, **kw):
    from attnbench.methods import as_prepared

    return as_prepared(METHODS[method].build(_ctx(method, mask, seq_q, seq_kv, params, **kw)))


def _decode_case(method, seq):
    """A causal build (chunk 4), seeded q, k, v [1, 2, seq, 8] and the method's extras (prepared), for the
    recurrent-step tests."""
    prepared = _build(method, "causal", seq, seq, params={"chunk": 4})
    q, k, v = _rand(1, 2, seq, 8, seed=1), _rand(1, 2, seq, 8, seed=2), _rand(1, 2, seq, 8, seed=3)
    extras = {n: e.make(torch.Generator().manual_seed(1), "cpu", torch.float32) for n, e in prepared.extras.items()}
    if prepared.prepare:
        extras.update(prepared.prepare(q, k, v, **extras))
    return prepared, (q, k, v), extras


@pytest.mark.parametrize("method", ["linear_attn", "performer", "cosformer", "gated_delta_rule", "simple_gla"])
def test_recurrent_step_equals_last_row_of_the_parallel_form(method):
    seq = 11
    prepared, (q, k, v), extras = _decode_case(method, seq)
    full = prepared.reference(q, k, v, **extras)
    state = prepared.decode.prefill(q[:, :, -1:], k, v, **extras)
    step = prepared.decode.step(state, q[:, :, -1:], k, v, **extras)
    assert _close(step, full[:, :, -1:])
    # the step does not change its state (the harness calls it repeatedly)
    again = prepared.decode.step(state, q[:, :, -1:], k, v, **extras)
    assert torch.equal(step, again)


@pytest.mark.parametrize("method,params,field", [
    ("performer", {"features": 0}, "features"),
    ("performer", {"redraw": "sometimes"}, "redraw"),
    ("linear_attn", {"chunk": -1}, "chunk"),
    ("rfa", {"sigma": 0.0}, "sigma"),
    ("gated_delta_rule", {"chunk": 1.5}, "chunk"),
    ("softmax_rnn", {"block": 0}, "block"),
])
def test_bad_hyper_parameters_name_the_field(method, params, field):
    with pytest.raises(ValueError, match=rf"method_options\.{method}\.{field}"):
        _build(method, "causal", 8, 8, params=params)


# ---- random features -----------------------------------------------------------------------------------------
def test_performer_features_are_seeded_and_follow_the_redraw_policy():
    q = k = v = _rand(1, 2, 8, 8)
    a = _build("performer", "causal", 8, 8, seed=3).prepare(q, k, v)["omega"]
    b = _build("performer", "causal", 8, 8, seed=3).prepare(q, k, v)["omega"]
    c = _build("performer", "causal", 8, 8, seed=3, params={"feature_seed": 1}).prepare(q, k, v)["omega"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    fixed = _build("performer", "causal", 8, 8, params={"redraw": "fixed"})
    assert fixed.prepare(q, k, v)["omega"] is fixed.prepare(q, k, v)["omega"]
    per_head = _build("performer", "causal", 8, 8, params={"per_head": True, "features": 12})
    assert per_head.prepare(q, k, v)["omega"].shape == (2, 12, 8)


def test_performer_orthogonal_features_are_unbiased():
    """E[exp(ω·x − |x|²/2)] = 1 for Gaussian-marginal ω; the unsigned QR (negative control) is biased."""
    d, m = 8, 40000
    x = torch.full((d,), 0.5)
    omega = performer.draw_omega(m, d, torch.Generator().manual_seed(0), "cpu", orthogonal=True)
    assert abs(float(torch.exp(omega @ x - x @ x / 2).mean()) - 1.0) < 0.03
    gen = torch.Generator().manual_seed(0)
    raw = torch.cat([torch.linalg.qr(torch.randn(d, d, generator=gen))[0].T for _ in range(m // d)])
    raw = raw * torch.randn(m, d, generator=gen).norm(dim=1, keepdim=True)
    assert abs(float(torch.exp(raw @ x - x @ x / 2).mean()) - 1.0) > 0.05


def test_performer_approaches_softmax_with_many_features():
    q, k, v = _rand(1, 1, 16, 8, seed=1) * 0.5, _rand(1, 1, 16, 8, seed=2) * 0.5, _rand(1, 1, 16, 8, seed=3)
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    errs = []
    for m in (8, 20000):
        prepared = _build("performer", "full", 16, 16, params={"features": m}, heads=1)
        out = prepared.fn(q, k, v, **prepared.prepare(q, k, v))
        errs.append(float((out - exact).norm() / exact.norm()))
    assert errs[1] < 0.05 < errs[0]


# ---- softmax as an RNN ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_q,seq_kv,block", [(10, 10, 3), (4, 10, 4), (10, 10, 16), (12, 7, 2)])
def test_softmax_rnn_forms_equal_softmax_values_and_grads(seq_q, seq_kv, block):
    q = _rand(1, 2, seq_q, 8, seed=1, requires_grad=True)
    k = _rand(1, 2, seq_kv, 8, seed=2, requires_grad=True)
    v = _rand(1, 2, seq_kv, 8, seed=3, requires_grad=True)
    offset = seq_kv - seq_q
    visible = common.causal_visible(seq_q, seq_kv, offset, "cpu")

    def exact(q, k, v):
        s = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~visible, float("-inf"))
        return torch.nan_to_num(torch.softmax(s, -1)) @ v

    want = _grads(exact, q, k, v)
    for form in (lambda a, b, c: softmax_rnn.block_recurrence(a, b, c, causal=True, offset=offset, block=block),
                 lambda a, b, c: softmax_rnn.token_recurrence(a, b, c, causal=True, offset=offset)):
        got = _grads(form, q, k, v)
        assert _close(got[0], want[0]) and all(_close(g, w) for g, w in zip(got[1], want[1]))


# ---- gated delta rule ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(gated_delta.VARIANTS))
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_gated_delta_chunked_matches_token_loop_values_and_grads(name, chunk):
    gated, delta, normalize = gated_delta.VARIANTS[name]
    q = _rand(1, 2, 11, 6, seed=1, requires_grad=True)
    k = _rand(1, 2, 11, 6, seed=2, requires_grad=True)
    v = _rand(1, 2, 11, 5, seed=3, requires_grad=True)
    g = F.logsigmoid(_rand(1, 2, 11, seed=4)).requires_grad_()
    beta = torch.rand(1, 2, 11, generator=torch.Generator().manual_seed(5)).requires_grad_()
    kw = dict(gated=gated, delta=delta, normalize=normalize)
    want = _grads(lambda *a: gated_delta.naive_recurrence(*a, **kw), q, k, v, g, beta)
    got = _grads(lambda *a: gated_delta.chunked(*a, chunk=chunk, **kw), q, k, v, g, beta)
    assert _close(got[0], want[0])
    unused = {"delta_rule": (3,), "simple_gla": (4,)}.get(name, ())
    for index, (a, b) in enumerate(zip(got[1], want[1])):
        assert _close(a, b, 1e-4) if index not in unused else (a.abs().max() == 0 and b.abs().max() == 0)


def test_gated_delta_chunked_catches_a_wrong_decay():
    """Negative control: dropping the inter-chunk decay (the gate applied within chunks only) disagrees."""
    q, k, v = _rand(1, 1, 12, 4, seed=1), _rand(1, 1, 12, 4, seed=2), _rand(1, 1, 12, 4, seed=3)
    g = F.logsigmoid(_rand(1, 1, 12, seed=4))
    beta = torch.rand(1, 1, 12, generator=torch.Generator().manual_seed(5))
    want = gated_delta.naive_recurrence(q, k, v, g, beta)
    g_broken = g.clone()
    g_broken[..., ::4] = 0.0  # the first token of every chunk loses its decay
    got = gated_delta.chunked(q, k, v, g_broken, beta, chunk=4)
    assert not _close(got, want, 1e-3)


# ---- fla adapters: the reference wrapper in fla's layout (fla itself needs a GPU) ---------------------------
@pytest.mark.parametrize("name", list(gated_delta.VARIANTS))
def test_fla_variant_reference_is_the_own_reference_in_bshd(name):
    from attnbench.methods.linear import fla_backends

    ctx = _ctx(f"fla_{name}", "causal", 9, 9)
    prepared = fla_backends._fla_variant(ctx, name, call=lambda *a: None)
    own = _build(name, "causal", 9, 9)
    q, k, v = _rand(1, 2, 9, 8, seed=1), _rand(1, 2, 9, 8, seed=2), _rand(1, 2, 9, 8, seed=3)
    own_extras = {n: e.make(torch.Generator().manual_seed(1), "cpu", torch.float32) for n, e in own.extras.items()}
    fla_extras = {n: t.transpose(1, 2).contiguous() for n, t in own_extras.items()}
    assert {n: e.shape for n, e in prepared.extras.items()} == {n: (1, 9, 2) for n in own.extras}
    got = prepared.reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **fla_extras)
    assert _close(got.transpose(1, 2), own.reference(q, k, v, **own_extras))


@pytest.mark.parametrize("method", ["linear_attn", "performer", "cosformer"])
def test_recurrent_step_builds_no_tensor_from_host_data(method):
    """A decode step is timed as the GPU runs it: a tensor made from host data (``torch.tensor([last],
    device=...)``, a host-to-device copy per step) would stall the stream each step. The step's ops contain no
    ``lift_fresh`` (what torch.tensor dispatches); negative control: a step that does build one is caught."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seq = 9
    prepared, (q, k, v), extras = _decode_case(method, seq)
    state = prepared.decode.prefill(q[:, :, -1:], k, v, **extras)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as seen:
        prepared.decode.step(state, q[:, :, -1:], k, v, **extras)
    assert not [n for n in seen.names if "lift_fresh" in n], seen.names
    with Ops() as control:
        torch.tensor([seq - 1], device=k.device)
    assert any("lift_fresh" in n for n in control.names)
