"""LaMamba's streamed fast form (``method_options.lamamba.stream``, :func:`lamamba.streamed_layer`): the layer a
piece at a time, the scan's state carried and each piece's conv given its left context, checkpointed with
gradients. It must equal the whole layer (values, input and parameter gradients, with and without autograd), its
two carried pieces of context must each matter (negative controls), bad values must be refused naming the field,
and its largest allocation must be one piece's, not the sequence's (the H200's 1M `oom` rows)."""
from __future__ import annotations

import pytest
import torch

from attnbench.methods.hybrid import lamamba

from test_linear_methods import _build, _close, _grads, _rand
from test_memory_scaling import SLACK, Audit, W, B, H, run_audit

SMALL = {"window": 8, "chunk": 4, "state_size": 4}
LENGTH = 52  # not a multiple of the piece: the last piece is short (and not a multiple of the window)


def _pair(stream: int, length: int = LENGTH):
    whole = _build("lamamba", "causal", length, length, params={**SMALL, "stream": 0})
    streamed = _build("lamamba", "causal", length, length, params={**SMALL, "stream": stream})
    return whole, streamed


@pytest.mark.parametrize("stream", [8, 16, 24])
def test_streamed_layer_equals_the_whole_layer_values_and_gradients(stream):
    whole, streamed = _pair(stream)
    x = _rand(1, LENGTH, 16, seed=3, requires_grad=True)
    with torch.no_grad():  # the timed fwd path: no checkpoint, pieces written into one output
        assert _close(streamed.fn(x), whole.fn(x), 1e-5)
    # the same parameters (one seed): the gradients of both reach the same tensors' values
    got = _grads(lambda x_, *_: streamed.fn(x_), x, *streamed.parameters)
    want = _grads(lambda x_, *_: whole.fn(x_), x, *whole.parameters)
    assert _close(got[0], want[0], 1e-5)
    assert all(_close(g, w, 1e-4) for g, w in zip(got[1], want[1]) if w.abs().max() > 0)
    # and the streamed form against the readable reference too
    assert _close(streamed.fn(x), streamed.reference(x), 1e-4)


@pytest.mark.parametrize("broken", ["carry", "conv_context"])
def test_dropping_the_carried_state_or_the_conv_context_is_caught(broken, monkeypatch):
    """Negative controls: a piece started from a zero state, or a conv that pads zeros at every piece's start,
    differs from the whole layer (so the equality above is not vacuous)."""
    whole, streamed = _pair(16)
    x = _rand(1, LENGTH, 16, seed=4)
    piece = lamamba._layer_piece
    if broken == "carry":
        monkeypatch.setattr(lamamba, "_layer_piece", lambda *a: piece(*a[:-1], False))
    else:
        def no_context(x_, start, stop, *rest):  # each piece alone: its conv sees zeros in front
            y, S = piece(x_[:, start:stop], 0, stop - start, *rest)
            return y, S
        monkeypatch.setattr(lamamba, "_layer_piece", no_context)
    with torch.no_grad():
        bad = streamed.fn(x)
        good = whole.fn(x)
    assert _close(bad[:, :16], good[:, :16], 1e-5)  # the first piece has nothing to lose
    assert not _close(bad[:, 16:], good[:, 16:], 1e-3)


def test_stream_values_are_validated_naming_the_field():
    for bad in (12, -8, "big", 2.5, True):  # 12: not a multiple of the window (8)
        with pytest.raises(ValueError, match=r"method_options\.lamamba\.stream"):
            _pair(bad)
    # auto: whole up to STREAM_AUTO_ABOVE, pieces of STREAM_AUTO_PIECE (whole windows and chunks) above
    assert lamamba.stream_piece(lamamba.STREAM_AUTO_ABOVE, "auto", 256, 64, "f") == 0
    assert lamamba.stream_piece(1 << 20, "auto", 256, 64, "f") == lamamba.STREAM_AUTO_PIECE
    assert lamamba.stream_piece(1 << 20, "auto", 384, 64, "f") % 384 == 0
    assert lamamba.stream_piece(64, 128, 8, 4, "f") == 0  # a piece longer than the sequence: whole


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_streaming_bounds_the_largest_allocation_by_the_piece(mode):
    """On meta tensors (tests/metashadow.py, as the memory audit): the whole layer's largest allocation is its
    in-projection [L, 2·width + 2·H·N + H]; streamed in pieces of 1024 it is the input-sized output [L, width] or
    one piece's projection, whichever is larger. Negative control: the same length whole exceeds that bound."""
    length, piece = 1 << 14, 1 << 10
    proj = 2 * W + 2 * H * 64 + H
    bound = B * max(length * W, piece * proj, H * piece // 64 * 64 * 64)
    streamed = Audit(length, lambda L: bound, None, "streamed", params={"stream": piece})
    whole = Audit(length, lambda L: bound, None, "whole", params={"stream": 0})
    fast, _ = run_audit("lamamba", streamed, mode, reference=False)
    assert fast.ops > 0 and fast.largest <= SLACK * bound * 4, (fast.largest, fast.where)
    fast_whole, _ = run_audit("lamamba", whole, mode, reference=False)
    assert fast_whole.largest > SLACK * bound * 4, (fast_whole.largest, fast_whole.where)



@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd", "bwd"])
def test_a_harness_row_with_the_streamed_layer_is_ok(mode):
    """The streamed layer through the case runner: gated against the reference (values and, in the backward
    modes, input and parameter gradients); bwd replays one held graph through the pieces' checkpoints."""
    from attnbench import masks
    from attnbench.config.plan import Case
    from attnbench.execute.case import CaseRunner

    spec = masks.make_mask("causal")
    timing = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False}
    options = {"timing": timing, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32,
               "method_options": {"lamamba": {**SMALL, "stream": 16}}}
    case = Case(method="lamamba", mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=56,
                seq_kv=56, head_dim=8, dtype="float32", mode=mode, seed=0)
    row = CaseRunner("cpu", options).run(case)
    assert row["status"] == "ok", row["reason"]
