"""The delta rules' and simple_gla's chunked PyTorch form run segment by segment (``segment``, issue 10):
the recurrent state carried across segments, each segment checkpointed in training. Segmented equals
unsegmented (values and every gradient, the carried state's included); dropping the carried state is caught;
the segmented form keeps much less between forward and backward; the hand-written backward of the chunk loop
passes gradcheck; bad option values name the field. CPU, tiny shapes, nothing timed."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared
from attnbench.methods.linear import gated_delta
from scriptload import load_script

# bf16 inputs (the benchmark's dtype): the gate's bf16 tolerance (bench/measure/gate.py TOLERANCE)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (8e-3, 9e-3)}


def _inputs(length, seq_q=None, dtype=torch.float32, heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq_q = length if seq_q is None else seq_q
    q = torch.randn(1, heads, seq_q, dim, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(1, heads, length, dim, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    g = F.logsigmoid(torch.randn(1, heads, length, generator=gen)).requires_grad_()
    beta = torch.rand(1, heads, length, generator=gen).requires_grad_()
    return q, k, v, g, beta


def _run(inputs, name, **kw):
    gated, delta, normalize = gated_delta.VARIANTS[name]
    out = gated_delta.chunked(*inputs, gated=gated, delta=delta, normalize=normalize, chunk=4, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if d is None else d for d, t in zip(grads, inputs)]


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(gated_delta.VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segmented_equals_unsegmented_values_and_gradients(name, dtype):
    """37 keys in segments of 10 (not a multiple of the chunk 4; the length not a multiple of the segment),
    30 queries aligned bottom-right; gradients of q, k, v, g and beta."""
    inputs = _inputs(37, seq_q=30, dtype=dtype)
    want = _run(inputs, name)
    got = _run(inputs, name, segment=10)
    out_tol, grad_tol = TOL[dtype]
    assert _rel(got[0], want[0]) < out_tol
    gated, delta, _ = gated_delta.VARIANTS[name]
    for index, (a, b) in enumerate(zip(got[1:], want[1:])):
        if (index == 3 and not gated) or (index == 4 and not delta):  # an input the variant does not read
            assert a.abs().max() == 0 and b.abs().max() == 0
        else:
            assert b.abs().max() > 0 and _rel(a, b) < grad_tol, (name, index)
    # negative control: each segment started from a zero state (the carried state dropped)
    broken = _run(inputs, name, segment=10, carry=False)
    assert _rel(broken[0], want[0]) > 10 * out_tol
    assert _rel(broken[3], want[3]) > 10 * grad_tol  # dv


@pytest.mark.parametrize("name", ["delta_rule", "gated_delta_rule"])
def test_segmented_carries_an_initial_state_and_its_gradient(name):
    """``state0`` in, final state out, both through the segments; the initial state's gradient equal too."""
    gated, delta, normalize = gated_delta.VARIANTS[name]
    inputs = _inputs(23)
    S0 = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
    kw = dict(gated=gated, delta=delta, normalize=normalize, chunk=4, state0=S0, return_state=True)
    results = []
    for segment in (0, 7):
        out, S = gated_delta.chunked(*inputs, segment=segment, **kw)
        (grad,) = torch.autograd.grad((out.sum() + S.square().sum()), (S0,))
        results.append((out.detach(), S.detach(), grad))
    for a, b in zip(*results):
        assert _rel(a, b) < 1e-5


def test_no_grad_segmented_equals_unsegmented():
    inputs = [t.detach() for t in _inputs(37, seq_q=30)]
    with torch.no_grad():
        want = gated_delta.chunked(*inputs, chunk=4)
        got = gated_delta.chunked(*inputs, chunk=4, segment=9)
        broken = gated_delta.chunked(*inputs, chunk=4, segment=9, carry=False)
    assert _rel(got, want) < 1e-5 and _rel(broken, want) > 1e-2


def test_chunk_loop_backward_passes_gradcheck():
    """The hand-written backward of the chunk loop (:class:`gated_delta._ChunkStates`), with and without W
    (the delta term), with an initial state that gets a gradient."""
    gen = torch.Generator().manual_seed(0)
    B, H, N, C, dk, dv = 1, 2, 3, 4, 3, 5

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    U, W, kd, s0 = rand(B, H, N, C, dv), rand(B, H, N, C, dk), rand(B, H, N, C, dk), rand(B, H, dk, dv)
    last = torch.rand(B, H, N, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(gated_delta.chunk_states, (U, W, kd, last, s0))
    assert torch.autograd.gradcheck(lambda u, kd, a, s: gated_delta.chunk_states(u, None, kd, a, s), (U, kd, last, s0))


def _memory_script():
    return load_script("linear_memory")


def test_segmented_keeps_much_less_between_forward_and_backward(monkeypatch):
    """At 8 segments, autograd's saved bytes (saved_tensors_hooks) and the live bytes kept after the forward
    (scripts/linear_memory.py's tracker) are a small fraction of the unsegmented form's; negative control:
    the same segments without the checkpoint save about as much as the unsegmented form."""
    inputs = _inputs(256, heads=2, dim=16)
    script = _memory_script()
    LiveBytes = script.LiveBytes

    def measure():
        with LiveBytes() as live:
            saved, out = script.saved_bytes(lambda: gated_delta.chunked(*inputs, chunk=8, segment=segment), inputs)
            kept = live.now
            torch.autograd.grad(out, inputs, torch.ones_like(out))
            del out
        return saved, kept, live.peak

    segment = 0
    full = measure()
    segment = 32
    seg = measure()
    assert seg[0] < full[0] / 8 and seg[1] < full[1] / 4 and seg[2] < full[2] / 2, (seg, full)
    monkeypatch.setattr(gated_delta, "checkpoint", lambda fn, *a, **kw: fn(*a))  # no checkpoint
    plain = measure()
    assert plain[0] > full[0] / 2 and plain[1] > full[1] / 2


def _ctx(method, params, seq=40):
    from attnbench import masks

    spec = masks.make_mask("causal")
    bound = spec.bind(seq, seq)
    case = SimpleNamespace(method=method, batch=1, heads_q=2, heads_kv=2, seq_q=seq, seq_kv=seq, head_dim=8,
                           seed=0, dtype="float32")
    return BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                        dtype=torch.float32, options={}, params=dict(params))


@pytest.mark.parametrize("value", [-1, 3, 1.5, True, "big", None])
def test_bad_segment_values_name_the_field(value):
    with pytest.raises(ValueError, match=r"method_options\.gated_delta_rule\.segment"):
        METHODS["gated_delta_rule"].build(_ctx("gated_delta_rule", {"chunk": 4, "segment": value}))


def test_segment_option_reaches_the_timed_function(monkeypatch):
    """``segment: 16`` at 40 tokens runs the segmented form; 'auto' (the default) does not at 40 tokens, and
    switches on above 128K keys only."""
    calls = []
    original = gated_delta.segmented
    monkeypatch.setattr(gated_delta, "segmented", lambda *a, **kw: calls.append(kw["segment"]) or original(*a, **kw))
    inputs = [t.detach() for t in _inputs(40)]
    for params in ({"chunk": 4, "segment": 16}, {"chunk": 4}, {"chunk": 4, "segment": 0}):
        for method in ("delta_rule", "gated_delta_rule", "simple_gla"):
            prepared = as_prepared(METHODS[method].build(_ctx(method, params)))
            extras = {n: t for n, t in zip(("g", "beta"), inputs[3:]) if n in prepared.extras}
            prepared.fn(*inputs[:3], **extras)
    assert calls == [16, 16, 16]
    assert gated_delta.segment_tokens("auto", 131072) == 0
    assert gated_delta.segment_tokens("auto", 131073) == 65536
    assert gated_delta.segment_tokens(0, 1 << 20) == 0 and gated_delta.segment_tokens(4096, 10) == 4096


def test_references_run_in_segments_above_the_auto_threshold(monkeypatch):
    """The references' chunked form (above the token loop's length) segments like 'auto', whatever the method's
    own segment option (segment: 0 here), and equals its unsegmented value: a 1M-token reference is one
    segment's memory (unsegmented, the decode sweep's 1M reference was an `oom` row)."""
    monkeypatch.setattr(gated_delta, "AUTO_SEGMENT_ABOVE", 32)
    monkeypatch.setattr(gated_delta, "AUTO_SEGMENT", 16)
    calls = []
    original = gated_delta.segmented
    monkeypatch.setattr(gated_delta, "segmented", lambda *a, **kw: calls.append(kw["segment"]) or original(*a, **kw))
    inputs = [t.detach() for t in _inputs(40)]
    for method in ("delta_rule", "gated_delta_rule", "simple_gla"):
        prepared = as_prepared(METHODS[method].build(_ctx(method, {"chunk": 4, "segment": 0,
                                                                    "reference_naive_max_len": 8})))
        extras = {n: t for n, t in zip(("g", "beta"), inputs[3:]) if n in prepared.extras}
        calls.clear()
        got = prepared.reference(*inputs[:3], **extras)
        assert calls == [16], (method, calls)
        gated, delta, normalize = gated_delta.VARIANTS[method]
        want = original(*inputs[:3], extras.get("g"), extras.get("beta"), segment=10 ** 6, gated=gated, delta=delta,
                        normalize=normalize, chunk=2)  # one segment: the unsegmented value
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), method
