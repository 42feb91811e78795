"""The ``rows=`` forms of the references outside the kernelised skeleton (abc, s4d, softmax_rnn, aaren,
lamamba, metamixer, linear_infsa): a long case (above ``correctness.ref_full_pairs``) is gated on a strided sample of query
rows, and the method's own reference then runs on those rows only, with a state carried over key/token chunks
(at 32K-1M tokens the full reference is O(L²) or does not fit). Here: each rows form equals the full reference's
rows (first and last rows, rows at streaming-chunk boundaries; causal, cross and full where the method runs
them), a stream that drops its carried state (or a window that forgets the sequence's edges) is caught, and a
long case through the CaseRunner takes the rows path and is ok (and wrong when the rows form is broken)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attnbench import masks
from attnbench.execute.case import _accepts
from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared
from attnbench.methods.hybrid import lamamba, metamixer
from attnbench.methods.linear import aaren, abc, rows as rows_mod, s4d, softmax_rnn
from tests.test_linear_rows import _run  # a long case through the CaseRunner with the rows gate forced

STREAM = 7  # keys (tokens) per streaming step here: several chunks at 40 tokens
HEADS, DIM = 2, 8


def _rand(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float() * scale


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _build(method, mask, seq_q, seq_kv, params):
    spec = masks.make_mask(mask)
    bound = spec.bind(seq_q, seq_kv)
    case = SimpleNamespace(method=method, batch=2, heads_q=HEADS, heads_kv=HEADS, seq_q=seq_q, seq_kv=seq_kv,
                           head_dim=DIM, seed=0, dtype="float32")
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                       dtype=torch.float32, options={}, params=dict(params))
    return as_prepared(METHODS[method].build(ctx))


def _args(prepared, form, seq_q, seq_kv):
    if form == "layer":
        return (_rand(2, seq_q, HEADS * DIM, seed=1),), {}
    q, k, v = (_rand(2, HEADS, n, DIM, seed=i) for i, n in ((1, seq_q), (2, seq_kv), (3, seq_kv)))
    gen = torch.Generator().manual_seed(4)
    extras = {n: e.make(gen, "cpu", torch.float32) * 3 for n, e in prepared.extras.items()}  # spread controls
    return (q, k, v), extras


def _rows(seq_q, seq_kv, causal):
    """First and last rows and rows whose last key opens or closes a streaming chunk."""
    offset = seq_kv - seq_q if causal else 0
    picks = {0, seq_q - 1}
    for edge in range(STREAM, seq_kv, STREAM):
        for key in (edge - 1, edge):
            row = key - offset
            if causal and 0 <= row < seq_q:
                picks.add(row)
    if not causal:
        picks |= {seq_q // 2, STREAM}
    return torch.tensor(sorted(p for p in picks if 0 <= p < seq_q))


CASES = [  # method, form, mask, seq_q, seq_kv, params
    ("abc", "qkv", "causal", 40, 40, {"slots": 5}),
    ("abc", "qkv", "causal", 24, 40, {"slots": 5}),  # cross, bottom-right
    ("abc", "qkv", "full", 24, 40, {"slots": 5}),
    ("softmax_rnn", "qkv", "causal", 40, 40, {}),
    ("softmax_rnn", "qkv", "causal", 24, 40, {}),
    ("softmax_rnn", "qkv", "full", 24, 40, {}),
    ("s4d", "layer", "causal", 40, 40, {"state_size": 8}),  # reference: the token loop
    ("s4d", "layer", "causal", 40, 40, {"state_size": 8, "reference_loop_max_len": 8}),  # the float64 FFT
    ("aaren", "layer", "causal", 40, 40, {}),
    ("lamamba", "layer", "causal", 40, 40, {"window": 6, "state_size": 4, "chunk": 4}),  # the token loop
    ("lamamba", "layer", "causal", 40, 40, {"window": 8, "state_size": 4, "chunk": 4, "reference_loop_max_len": 8}),
    ("metamixer", "layer", "causal", 40, 40, {"k1": 5, "k2": 4}),
    ("metamixer", "layer", "full", 40, 40, {"k1": 5, "k2": 7}),
    ("linear_infsa", "qkv", "full", 24, 40, {}),
]


@pytest.mark.parametrize("method, form, mask, seq_q, seq_kv, params", CASES)
def test_rows_form_equals_the_full_reference_rows(method, form, mask, seq_q, seq_kv, params):
    # the streamed chunk for the methods that take it (metamixer and linear_infsa have no stream to chunk)
    stream = {"reference_stream_chunk": STREAM} if "reference_stream_chunk" in METHODS[method].options else {}
    prepared = _build(method, mask, seq_q, seq_kv, {**stream, **params})
    assert _accepts(prepared.reference, "rows")
    args, extras = _args(prepared, form, seq_q, seq_kv)
    rows = _rows(seq_q, seq_kv, mask == "causal")
    with torch.no_grad():
        full = prepared.reference(*args, **extras)
        got = prepared.reference(*args, rows=rows, **extras)
    want = full[:, rows] if form == "layer" else full[:, :, rows]
    assert got.shape == want.shape and got.dtype == torch.float32
    assert want.abs().max() > 0.1  # a non-trivial output
    assert _rel(got, want) < 2e-6, (method, mask, _rel(got, want))


def test_s4d_rows_default_chunk_and_no_keys():
    """s4d's chunk sized by its budget (one chunk here) equals the loop; softmax_rows with no visible key is 0."""
    params = {k: t.detach() for k, t in s4d.init_parameters(6, 8, torch.Generator().manual_seed(0), "cpu").items()}
    ssm = {k: t for k, t in params.items() if k not in ("d", "w_o")}
    x = _rand(2, 30, 6, seed=1)
    rows = torch.tensor([0, 13, 29])
    assert _rel(s4d.s4d_rows(x, ssm, rows), s4d.s4d_loop(x, ssm)[:, rows]) < 2e-6
    q, k, v = _rand(1, 2, 3, 4, seed=1), _rand(1, 2, 5, 4, seed=2), _rand(1, 2, 5, 4, seed=3)
    out = softmax_rnn.softmax_rows(q, k, v, torch.tensor([0, 2]), causal=True, offset=-4, chunk=2)
    assert out.shape == (1, 2, 2, 4) and torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="chunk"):
        rows_mod.softmax_rows(lambda a, b: None, 5, torch.tensor([1]), chunk=0)


# ---- negative controls: each mechanism's broken variant is caught ------------------------------------------------
def test_abc_rows_that_drop_the_carried_sums_are_caught():
    q, k, v, s = _rand(2, 2, 40, 8, seed=1), _rand(2, 2, 40, 8, seed=2), _rand(2, 2, 40, 8, seed=3), _rand(2, 2, 40, 5, seed=4, scale=3)
    rows = _rows(40, 40, True)
    want = abc.abc_reference(q, k, v, s, causal=True, offset=0)[:, :, rows]
    assert _rel(abc.abc_rows(q, k, v, s, rows, causal=True, offset=0, chunk=STREAM), want) < 2e-6
    assert _rel(abc.abc_rows(q, k, v, s, rows, causal=True, offset=0, chunk=STREAM, carry=False), want) > 1e-2


def test_s4d_rows_that_drop_the_carried_state_are_caught():
    params = {k: t.detach() for k, t in s4d.init_parameters(6, 8, torch.Generator().manual_seed(0), "cpu").items()}
    ssm = {k: t for k, t in params.items() if k not in ("d", "w_o")}
    x = _rand(2, 40, 6, seed=1)
    rows = _rows(40, 40, True)
    want = s4d.s4d_loop(x, ssm)[:, rows]
    assert _rel(s4d.s4d_rows(x, ssm, rows, chunk=STREAM), want) < 2e-6
    assert _rel(s4d.s4d_rows(x, ssm, rows, chunk=STREAM, carry=False), want) > 1e-2


def test_softmax_streams_that_drop_the_running_state_are_caught():
    """softmax_rnn and aaren share rows.softmax_rows: a stream that restarts (m, c, a) per chunk is caught."""
    q, k, v = _rand(2, 2, 24, 8, seed=1), _rand(2, 2, 40, 8, seed=2), _rand(2, 2, 40, 8, seed=3)
    rows = _rows(24, 40, True)
    want = softmax_rnn.token_recurrence(q, k, v, causal=True, offset=16)[:, :, rows]
    kw = dict(causal=True, offset=16, chunk=STREAM)
    assert _rel(softmax_rnn.softmax_rows(q, k, v, rows, **kw), want) < 2e-6
    assert _rel(softmax_rnn.softmax_rows(q, k, v, rows, carry=False, **kw), want) > 1e-2
    params = {k: t.detach() for k, t in aaren.init_parameters(16, 2, torch.Generator().manual_seed(0), "cpu").items()}
    x = _rand(2, 40, 16, seed=5, scale=2)
    rows = _rows(40, 40, True)
    want = aaren.aaren_layer(params, 2, aaren.scan_loop)(x)[:, rows]
    assert _rel(aaren.aaren_rows(params, 2, x, rows, chunk=STREAM), want) < 2e-6
    assert _rel(aaren.aaren_rows(params, 2, x, rows, chunk=STREAM, carry=False), want) > 1e-2


def test_a_lamamba_scan_that_drops_its_carried_state_is_caught():
    prepared = _build("lamamba", "causal", 40, 40, {"window": 6, "state_size": 4, "chunk": 4})
    names = ["w_in", "conv", "dt_bias", "a_log", "d", "w_out", "w_qkv", "w_o"]  # the builder's creation order
    p = {n: t.detach() for n, t in zip(names, prepared.parameters)}
    x = _rand(2, 40, HEADS * DIM, seed=1)
    rows = _rows(40, 40, True)
    with torch.no_grad():
        want = prepared.reference(x)[:, rows]
        assert _rel(lamamba.lamamba_rows(x, rows, p, HEADS, 4, 6, 8, STREAM), want) < 2e-6
        assert _rel(lamamba.lamamba_rows(x, rows, p, HEADS, 4, 6, 8, STREAM, carry=False), want) > 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_a_mixer_window_that_ignores_the_sequence_edges_is_caught(causal):
    prepared = _build("metamixer", "causal" if causal else "full", 40, 40, {"k1": 5, "k2": 3})
    w_pw, gamma, beta, c1, c2 = (t.detach() for t in prepared.parameters)
    x = _rand(2, 40, HEADS * DIM, seed=1)
    rows = torch.tensor([0, 1, 20, 38, 39])
    with torch.no_grad():
        want = prepared.reference(x)[:, rows]
    assert _rel(metamixer.mixer_rows(x, rows, w_pw, gamma, beta, c1, c2, causal), want) < 2e-6
    assert _rel(metamixer.mixer_rows(x, rows, w_pw, gamma, beta, c1, c2, causal, pad=False), want) > 1e-2


# ---- through the case runner --------------------------------------------------------------------------------------
RUNNER = [("s4d", s4d, "s4d_rows", "fwd_bwd", {"state_size": 8}), ("abc", abc, "abc_rows", "fwd", {"slots": 4})]


@pytest.mark.parametrize("method, module, name, mode, opts", RUNNER)
def test_a_long_case_is_gated_on_the_rows_form(monkeypatch, method, module, name, mode, opts):
    calls = []
    original = getattr(module, name)

    def spy(*a, **kw):
        rows = a[2] if name == "s4d_rows" else a[4]
        calls.append(rows.numel())
        return original(*a, **kw)

    monkeypatch.setattr(module, name, spy)
    row = _run(method, mode, {"reference_stream_chunk": 16, **opts}, monkeypatch)
    assert row["status"] == "ok", row["reason"]
    assert calls and all(count == 9 for count in calls)  # the reference ran on the 9 sampled rows only
    if mode == "fwd_bwd":
        assert "grads_not_gated" in (row["flags"] or "")
    assert row["rel_err"] < 1e-5


@pytest.mark.parametrize("method, module, name, mode, opts", RUNNER)
def test_a_broken_rows_form_makes_the_long_case_wrong(monkeypatch, method, module, name, mode, opts):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: original(*a, **{**kw, "carry": False}))
    row = _run(method, mode, {"reference_stream_chunk": 16, **opts}, monkeypatch)
    assert row["status"] == "wrong" and "rel_err" in row["reason"]
