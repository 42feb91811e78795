"""s4d's FFT convolution in channel groups (``group``) and abc's causal fast path in token segments
(``segment``), for 1M tokens on one H200: s4d's fwd and fwd_bwd and abc's fwd_bwd were `oom` there
(results/linear-summary.md), their whole-sequence forms holding many full-size fp32/complex tensors at once.

Each grouped/segmented form equals the form before (values and every gradient); live bytes, counted by
scripts/linear_memory.py's dispatch tracker (every op's new storages followed until freed), are bounded in
full-size units (one fp32 tensor the size of the input: [L, C] for s4d, [H, L, d] for abc) in the forward, kept
between forward and backward, and over forward and backward; negative controls: the form before (one group /
no segments) and the deliberately broken variants (``fault=``: groups/segments not checkpointed, s4d's group
output kept as a view of its 2L-long transform) break the bounds. Bad option values name the field; the options
reach the timed function. CPU, small shapes, nothing timed."""
from __future__ import annotations

import pytest
import torch

from attnbench.methods.linear import abc, s4d

from scriptload import load_script
from test_linear_methods import _build, _close, _rand

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: two threads contend on the 2-core box


def _live_bytes():
    module = load_script("linear_memory")
    return module.LiveBytes


def _measure(run, leaves, full):
    """(forward peak without gradients, kept after the forward with gradients, peak over forward and
    backward), in units of ``full`` bytes, the live bytes of new storages (inputs not counted)."""
    LiveBytes = _live_bytes()
    with torch.no_grad(), LiveBytes() as fwd:
        run()
    for t in leaves:
        t.requires_grad_(True)
    with LiveBytes() as both:
        out = run()
        kept = both.now
        torch.autograd.grad(out, leaves, torch.ones_like(out))
        del out
    for t in leaves:
        t.requires_grad_(False)
    return fwd.peak / full, kept / full, both.peak / full


# ---- s4d ---------------------------------------------------------------------------------------------------------
def _s4d_params(width, seed=0):
    params = s4d.init_parameters(width, 4, torch.Generator().manual_seed(seed), "cpu")
    return {k: v for k, v in params.items() if k not in ("d", "w_o")}


@pytest.mark.parametrize("group", [1, 4, 5])  # 5: the last group shorter
def test_s4d_groups_equal_the_all_channel_form_values_and_gradients(group):
    ssm = _s4d_params(12)
    x = _rand(2, 37, 12, seed=1, requires_grad=True)
    leaves = [x, *ssm.values()]
    upstream = _rand(2, 37, 12, seed=2)

    def run(**kw):
        y = s4d.s4d_fft(x, ssm, **kw)
        return (y,) + torch.autograd.grad(y, leaves, upstream)

    before, grouped = run(group=12), run(group=group)
    for a, b in zip(before, grouped):
        assert _close(b, a, 1e-5)
    assert _close(s4d.s4d_fft64(x.detach(), ssm, group=group), s4d.s4d_loop(x.detach(), ssm), 1e-4)
    with pytest.raises(ValueError, match="group"):
        s4d.s4d_conv(x, ssm, group=0)


def test_s4d_groups_keep_group_sized_buffers_and_save_nothing_full_size_for_the_backward():
    """At 8 groups: forward peak 2 full-size units (the groups' outputs and their concatenation; 8 before: the
    kernel, spectra, padded input and product of every channel at once), about one unit kept for the backward
    (13 before), backward peak below 8 (22 before)."""
    length, width = 256, 32
    ssm = _s4d_params(width)
    x = _rand(1, length, width, seed=3)
    leaves = [x, *ssm.values()]
    full = length * width * 4

    def measure(**kw):
        return _measure(lambda: s4d.s4d_fft(x, ssm, **kw), leaves, full)

    fwd, kept, peak = measure(group=4)
    assert fwd <= 2.5 and kept <= 1.5 and peak <= 8, (fwd, kept, peak)
    before = measure(group=width)  # negative control: all channels at once (the form before)
    assert before[0] >= 6 and before[1] >= 8 and before[2] >= 15, before
    unsaved = measure(group=4, fault="nocheckpoint")  # negative control: the groups' buffers saved
    assert unsaved[1] >= 8, unsaved
    view = measure(group=4, fault="view")  # negative control: each output a view of its [G, 2L] transform
    assert view[0] >= 2.9, view


# ---- abc ---------------------------------------------------------------------------------------------------------
def _abc_inputs(length, heads=2, dim=8, slots=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen) for _ in range(3))
    return q, k, v, torch.randn(1, heads, length, slots, generator=gen)


@pytest.mark.parametrize("segment", [8, 12, 64])  # 12: not a multiple of the chunk; 64: one segment
def test_abc_segments_equal_the_whole_form_values_and_gradients(segment):
    inputs = [t.double().requires_grad_() for t in _abc_inputs(45)]
    upstream = torch.randn(1, 2, 45, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def run(form):
        out = form(*inputs)
        return (out,) + torch.autograd.grad(out, inputs, upstream)

    whole = run(lambda q, k, v, s: abc.abc_chunked(q, k, v, s, causal=True, offset=0, chunk=4))
    segmented = run(lambda q, k, v, s: abc.abc_segmented(q, k, v, s, chunk=4, segment=segment))
    for a, b in zip(whole, segmented):
        assert _close(b, a, 1e-5)
    # negative control: a segment that does not start from the sums carried in disagrees
    original = abc._segment

    def zero(q, k, v, s, shift, mem_k, mem_v, z, chunk):
        return original(q, k, v, s, shift, 0 * mem_k, 0 * mem_v, 0 * z, chunk)

    abc._segment = zero
    try:
        assert not _close(abc.abc_segmented(*inputs, chunk=4, segment=8), whole[0], 1e-3)
    finally:
        abc._segment = original
    with pytest.raises(ValueError, match="segment"):
        abc.abc_segmented(*inputs, chunk=4, segment=0)


def test_abc_segments_keep_segment_sized_buffers_and_save_nothing_full_size_for_the_backward():
    """At 8 segments: forward peak about 2 full-size units ([H, L, d] fp32; 8.8 before: fp32 copies of q, k, v,
    scores and slot weights of the whole sequence), about one unit kept for the backward (7.8 before; 13.8 with
    the segments not checkpointed), backward peak below 9 (the gradients themselves: 3.5 units, concatenated)."""
    length = 256
    inputs = list(_abc_inputs(length, dim=16, slots=8))
    full = 2 * length * 16 * 4

    def measure(segment, fault=None):
        def run():
            if segment:
                return abc.abc_segmented(*inputs, chunk=16, segment=segment, fault=fault)
            return abc.abc_chunked(*inputs, causal=True, offset=0, chunk=16)

        return _measure(run, inputs, full)

    fwd, kept, peak = measure(32)
    assert fwd <= 3 and kept <= 2 and peak <= 9, (fwd, kept, peak)
    before = measure(0)  # negative control: the whole sequence at once (the form before)
    assert before[0] >= 6 and before[1] >= 6, before
    unsaved = measure(32, "nocheckpoint")  # negative control: the segments' intermediates saved
    assert unsaved[1] >= 8 and unsaved[2] >= 12, unsaved


# ---- options -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, params, field", [
    ("s4d", {"state_size": 4, "group": 0}, "group"), ("s4d", {"state_size": 4, "group": 1.5}, "group"),
    ("abc", {"slots": 4, "chunk": 4, "segment": -4}, "segment"), ("abc", {"slots": 4, "chunk": 4, "segment": 6}, "segment"),
    ("abc", {"slots": 4, "chunk": 4, "segment": True}, "segment")])
def test_bad_group_and_segment_values_name_the_field(method, params, field):
    with pytest.raises(ValueError, match=rf"method_options\.{method}\.{field}"):
        _build(method, "causal", 16, 16, params=params)


def test_group_and_segment_options_reach_the_timed_function(monkeypatch):
    calls = {"s4d": 0, "abc": 0}
    group_fn, segment_fn = s4d._conv_group, abc._segment

    def count(name, fn):
        def spy(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return spy

    monkeypatch.setattr(s4d, "_conv_group", count("s4d", group_fn))
    monkeypatch.setattr(abc, "_segment", count("abc", segment_fn))
    _build("s4d", "causal", 16, 16, params={"state_size": 4, "group": 4}).fn(_rand(1, 16, 16, seed=5))  # width 16
    prepared = _build("abc", "causal", 16, 16, params={"slots": 4, "chunk": 4, "segment": 8})
    q, k, v, s = _abc_inputs(16)  # heads 2, head dim 8, 4 slots: _build's case
    prepared.fn(q, k, v, s)
    assert calls == {"s4d": 4, "abc": 2}
    calls.update(s4d=0, abc=0)
    _build("abc", "causal", 16, 16, params={"slots": 4, "chunk": 4, "segment": 0}).fn(q, k, v, s)  # 0: off
    assert calls["abc"] == 0

