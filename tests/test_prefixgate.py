"""The gradient gate of long cases on a prefix: above ``correctness.ref_full_pairs`` the forward is gated on
sampled rows and, where the mask is closed at P (no query before P sees a key at or after P) and the method
declares ``Capabilities.prefix_closed`` (exact q/k/v methods by default), the first call's backward runs with a
dout that is 0 from P on, and its gradients are compared with the reference's on the first P positions (and
with 0 after). Here ``ref_full_pairs`` is 64² so that 256 tokens take that path with P = 64 (of 256 tokens).

- an exact method (sdpa_math) on causal, sliding-window and short-prefix-LM masks, fwd_bwd and bwd: ``ok``,
  flagged ``grads_gated_on_prefix(64)``;
- negative controls (today ``ok`` + ``grads_not_gated``): a backward whose dk is 1.5x, whose dv is zeroed on a
  block inside the prefix, whose dk is nonzero after the prefix, or that ignores the mask; delta_rule with a
  broken chunk-loop backward: each is ``wrong``, naming the gradient;
- full (noncausal) and long-prefix-LM masks, cross attention, a method that does not declare the capability, a
  prefix below ``grad_prefix_min``: ``grads_not_gated`` with the reason;
- the linear methods (own references, extras per token, a ``bshd`` layout): ``ok`` with the prefix flag;
- the pieces: the mask's closure from its closed form and from a generic ``mask_mod``, its corner, P's
  arithmetic, and the token axes of an own reference's inputs (an unclear one is refused).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute import case as case_module
from attnbench.execute.case import CaseRunner
from attnbench.methods import METHODS, Capabilities, Extra, MethodSpec, Prepared
from attnbench.methods.linear import gated_delta

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: two threads contend on a 2-core box
TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False}
SEQ, PREFIX = 256, 64


@pytest.fixture(autouse=True)
def few_sampled_rows(monkeypatch):
    monkeypatch.setattr(case_module, "GATE_SAMPLE_ROWS", 17)  # the forward's strided sample (first and last rows)


def _run(method, mask="causal", mode="fwd_bwd", seq=SEQ, seq_kv=None, opts=None, grad_prefix_min=32, heads=2,
         dim=8):
    spec = masks.make_mask(mask)
    options = {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32,
               "method_options": {method: dict(opts or {})}, "ref_full_pairs": PREFIX * PREFIX,
               "grad_prefix_min": grad_prefix_min}
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=heads, heads_kv=heads,
                seq_q=seq, seq_kv=seq_kv or seq, head_dim=dim, dtype="float32", mode=mode, seed=0)
    return CaseRunner("cpu", options).run(case)


def _flags(row) -> str:
    return row.get("flags") or ""


# ---- test methods: exact attention with a deliberately wrong backward ----------------------------------------
class _EditGrad(torch.autograd.Function):
    """Identity forward; the backward passes the incoming gradient through ``edit``."""

    @staticmethod
    def forward(ctx, x, edit):
        ctx.edit = edit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.edit(grad.clone()), None


def _scaled(g):
    return g * 1.5


def _block_zeroed(g):  # a later block inside the prefix loses its gradient
    g[:, :, PREFIX - 16:PREFIX] = 0
    return g


def _tail_written(g):  # garbage after the prefix only: the part before it is right
    g[:, :, PREFIX:] += 1.0
    return g


def _exact_method(name, edit_k=None, edit_v=None, mask_blind_backward=False):
    """sdpa (math) causal attention, exact (gated against the harness reference), with an edited backward."""

    def build(ctx):
        causal = ctx.mask.causal

        def fn(q, k, v):
            k2 = _EditGrad.apply(k, edit_k) if edit_k else k
            v2 = _EditGrad.apply(v, edit_v) if edit_v else v
            out = F.scaled_dot_product_attention(q, k2, v2, is_causal=causal)
            if mask_blind_backward:  # forward causal, gradients those of the full mask
                full = F.scaled_dot_product_attention(q, k2, v2)
                out = out.detach() + full - full.detach()
            return out

        return fn

    return MethodSpec(name=name, build=build, caps=Capabilities(family="exact", backward=True))


@pytest.fixture
def broken(monkeypatch):
    """Register the broken exact methods for one test."""
    for spec in (_exact_method("t_pg_dk_scaled", edit_k=_scaled), _exact_method("t_pg_dv_block", edit_v=_block_zeroed),
                 _exact_method("t_pg_dk_tail", edit_k=_tail_written),
                 _exact_method("t_pg_mask_blind", mask_blind_backward=True), _exact_method("t_pg_right")):
        monkeypatch.setitem(METHODS, spec.name, spec)


# ---- exact methods ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask, mode", [("causal", "fwd_bwd"), ("causal", "bwd"),
                                        ({"name": "sliding_window", "left": 20, "right": 0}, "fwd_bwd"),
                                        ({"name": "prefix_lm", "prefix": 40}, "fwd_bwd")])
def test_an_exact_method_passes_with_its_gradients_gated_on_the_prefix(mask, mode):
    row = _run("sdpa_math", mask, mode)
    assert row["status"] == "ok", row["reason"]
    assert f"grads_gated_on_prefix({PREFIX})" in _flags(row) and "grads_not_gated" not in _flags(row)
    assert row["rel_err"] < 1e-5


@pytest.mark.parametrize("method, grad, after", [("t_pg_dk_scaled", "dk", False), ("t_pg_dv_block", "dv", False),
                                                 ("t_pg_dk_tail", "dk", True), ("t_pg_mask_blind", "dq", False)])
def test_a_wrong_backward_is_wrong_on_the_prefix_where_it_used_to_pass(broken, method, grad, after):
    """Each of these passed before the prefix gate (``ok`` with ``grads_not_gated``): the forward is right."""
    row = _run("t_pg_right")
    assert row["status"] == "ok" and f"grads_gated_on_prefix({PREFIX})" in _flags(row), row["reason"]
    row = _run(method)
    assert row["status"] == "wrong", (row["status"], row["reason"])
    assert "rel_err" in row["reason"] and row["reason"].startswith(grad), row["reason"]
    tail = float(row["reason"].split(" after them")[0].rsplit(", ", 1)[1])  # the part after the prefix
    assert (tail > 1e-3) == after, row["reason"]
    # where the gradients cannot be gated on a prefix, the same method passes, flagged
    row = _run(method, mask="full") if method != "t_pg_mask_blind" else _run(method, grad_prefix_min=PREFIX + 1)
    assert row["status"] == "ok" and "grads_not_gated" in _flags(row), row["reason"]


def test_the_gate_dout_is_the_first_calls_only(broken, monkeypatch):
    """The gate's backward uses dout cut at P; without the cut the prefix comparison fails (so the cut is what
    makes it right), and the timed calls keep the case's own dout."""
    douts = []
    original = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, **kw):
        if isinstance(grad_outputs, torch.Tensor) and grad_outputs.dim() == 4 and grad_outputs.shape[2] == SEQ:
            douts.append(bool(grad_outputs[:, :, PREFIX:].abs().sum() == 0))
        return original(outputs, inputs, grad_outputs, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    row = _run("t_pg_right")
    assert row["status"] == "ok", row["reason"]
    assert douts[0] is True and douts[1:] and not any(douts[1:])  # the first call's, then the timed ones'
    monkeypatch.setattr(case_module, "_zero_after", lambda dout, axis, length: dout)
    row = _run("t_pg_right")
    assert row["status"] == "wrong" and "rel_err" in row["reason"], row["reason"]


@pytest.mark.parametrize("kwargs, reason", [
    (dict(mask="full"), f"mask not closed at {PREFIX}"),
    (dict(mask={"name": "prefix_lm", "prefix": 100}), f"mask not closed at {PREFIX}"),
    (dict(seq=128, seq_kv=256), "cross attention"),
    (dict(grad_prefix_min=PREFIX + 1), f"prefix {PREFIX} < grad_prefix_min {PREFIX + 1}"),
])
def test_where_the_prefix_gate_cannot_apply_the_row_says_why(kwargs, reason):
    row = _run("sdpa_math", **kwargs)
    assert row["status"] == "ok", row["reason"]
    assert f"grads_not_gated(seq_q*seq_kv>ref_full_pairs: {reason})" in _flags(row), _flags(row)
    assert "grads_gated_on_prefix" not in _flags(row)


# ---- methods gated by their own reference -------------------------------------------------------------------------
LINEAR = [("gated_delta_rule", {"chunk": 16}), ("linear_attn", {"chunk": 32}), ("performer", {"features": 16, "chunk": 32})]


@pytest.mark.parametrize("method, opts", LINEAR, ids=[m for m, _ in LINEAR])
def test_a_linear_method_passes_with_its_gradients_gated_on_the_prefix(method, opts):
    row = _run(method, opts=opts)
    assert row["status"] == "ok", row["reason"]
    assert f"grads_gated_on_prefix({PREFIX})" in _flags(row), _flags(row)
    assert row["rel_err"] < 1e-4


def test_a_broken_delta_rule_backward_is_wrong_on_the_prefix(monkeypatch):
    """The H200's case: a delta rule whose chunk-loop backward is wrong (here its state gradient 1.5x) was ``ok``
    with ``grads_not_gated`` above ref_full_pairs; on the prefix it is ``wrong`` (the right one passes)."""
    row = _run("delta_rule", opts={"chunk": 16})
    assert row["status"] == "ok", row["reason"]
    assert f"grads_gated_on_prefix({PREFIX})" in _flags(row), _flags(row)
    backward = gated_delta._ChunkStates.backward

    def broken(ctx, dstates, dS):
        grads = list(backward(ctx, dstates, dS))
        grads[0] = grads[0] * 1.5
        return tuple(grads)

    monkeypatch.setattr(gated_delta._ChunkStates, "backward", staticmethod(broken))
    row = _run("delta_rule", opts={"chunk": 16})
    assert row["status"] == "wrong" and row["reason"].split(" ")[0] in ("dk", "dv", "dbeta", "dq"), row["reason"]
    assert f"gated on the first {PREFIX} positions" in row["reason"]


def test_a_method_that_does_not_declare_the_capability_keeps_grads_not_gated(monkeypatch):
    spec = METHODS["linear_attn"]
    undeclared = MethodSpec(name="t_pg_undeclared", build=spec.build,
                            caps=dataclasses.replace(spec.caps, prefix_closed=None), options=spec.options)
    monkeypatch.setitem(METHODS, undeclared.name, undeclared)
    assert not undeclared.caps.closed_on_prefixes() and METHODS["sdpa_math"].caps.closed_on_prefixes()
    row = _run("t_pg_undeclared", opts={"chunk": 32})
    assert row["status"] == "ok", row["reason"]
    assert "grads_not_gated(seq_q*seq_kv>ref_full_pairs: not prefix_closed)" in _flags(row), _flags(row)


def _bshd_gla(name, token_axis_first=False):
    """simple_gla's operator in the ``bshd`` layout, with its gate ``g`` [B, L, H] (a per-token extra on axis 1),
    as fla's twins take it; ``token_axis_first``: g laid out [L, B, H] instead (an unclear token axis)."""

    def build(ctx):
        case = ctx.case
        kw = dict(gated=True, delta=False, normalize=False)
        bhsd = (lambda g: g.permute(1, 2, 0)) if token_axis_first else (lambda g: g.transpose(1, 2))

        def fn(q, k, v, g):
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            return t(gated_delta.chunked(t(q), t(k), t(v), bhsd(g), chunk=16, **kw))

        def reference(q, k, v, g, rows=None):
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            if rows is not None:
                return t(gated_delta.gated_rows(t(q), t(k), t(v), bhsd(g), rows))
            return t(gated_delta.naive_recurrence(t(q), t(k), t(v), bhsd(g), **kw))

        shape = (case.seq_kv, case.batch, case.heads_q) if token_axis_first else (case.batch, case.seq_kv, case.heads_q)
        return Prepared(fn=fn, reference=reference, extras={"g": Extra(shape=shape, init="logsigmoid")},
                        softmax_comparable=False, chunk=16)

    caps = Capabilities(family="linear", exact=False, masks={"causal"}, causal_only=True, backward=True,
                        input_layout="bshd", prefix_closed=True)
    return MethodSpec(name=name, build=build, caps=caps)


def test_a_bshd_method_with_a_per_token_extra_is_cut_on_its_token_axes(monkeypatch):
    for spec in (_bshd_gla("t_pg_bshd"), _bshd_gla("t_pg_unclear", token_axis_first=True)):
        monkeypatch.setitem(METHODS, spec.name, spec)
    row = _run("t_pg_bshd", seq=128)  # P = 64 of 128 tokens (the reference's token loop)
    assert row["status"] == "ok", row["reason"]
    assert f"grads_gated_on_prefix({PREFIX})" in _flags(row), _flags(row)
    row = _run("t_pg_unclear", seq=128)  # g [L, B, H]: its token axis is not the layout's
    assert row["status"] == "ok", row["reason"]
    assert "grads_not_gated(seq_q*seq_kv>ref_full_pairs: g: token axis of a (128, 1, 2) input unclear)" in _flags(row)


# ---- the pieces -------------------------------------------------------------------------------------------------------
CLOSURE_MASKS = ["causal", "full", {"name": "sliding_window", "left": 30, "right": 0},
                 {"name": "sliding_window", "left": 30, "right": 5}, {"name": "prefix_lm", "prefix": 60},
                 {"name": "prefix_lm", "prefix": 70}, {"name": "document", "lengths": [50, 78, 72], "causal": True},
                 {"name": "document", "lengths": [64, 136]}, "bigbird"]


@pytest.mark.parametrize("mask", CLOSURE_MASKS, ids=str)
def test_the_closure_check_counts_the_pairs_past_the_prefix_as_the_dense_mask_does(mask):
    bound = masks.make_mask(mask).bind(200, 200)
    dense = bound.dense()
    for prefix in (1, 64, 128, 199):
        assert bound.pairs_past_prefix(prefix) == int(dense[:prefix, prefix:].sum())
    assert torch.equal(bound.prefix_corner(64).dense(), dense[:64, :64])


def test_a_generic_mask_mod_is_checked_pair_by_pair_within_a_budget():
    spec = masks.make_mask("causal")
    bound = spec.bind(200, 200)

    class Generic(masks.BoundMask):  # the causal predicate without a closed form
        def mask_mod(self, b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) | ((q_idx == 3) & (kv_idx == 150))  # one pair past 64

    generic = Generic(spec, 200, 200)
    assert type(generic).block_counts is masks.BoundMask.block_counts
    assert generic.pairs_past_prefix(64) == 1 and generic.pairs_past_prefix(151) == 0
    assert generic.pairs_past_prefix(64, max_pairs=64 * 136 - 1) is None  # over the budget: not checked
    assert bound.pairs_past_prefix(64) == 0


def test_the_prefix_length_is_the_largest_block_multiple_under_the_budget():
    def length(pairs, chunk=None):
        runner = CaseRunner("cpu", {"timing": TIMING, "ref_full_pairs": pairs})
        return runner._prefix_length(Prepared(fn=lambda q, k, v: q, chunk=chunk))

    assert length(1 << 32) == 65536 and length(1 << 32, chunk=64) == 65536
    assert length(4096 ** 2) == 4096 and length(10 ** 9) == 28672  # isqrt 31622, blocks of 4096
    assert length(128 ** 2) == 128 and length(128 ** 2 + 5) == 128 and length(1000) == 16
    assert length(1 << 32, chunk=96) == 61440  # lcm(4096, 96) = 12288
    assert length(128 ** 2, chunk=48) == 96  # lcm(128, 48) > 128: the chunk's multiples


def test_token_axes_cut_per_token_tensors_and_refuse_unclear_ones():
    q = torch.zeros(1, 2, 64, 8)
    g = torch.zeros(1, 2, 64)
    omega = torch.zeros(16, 8)
    call = case_module.Call((q, q, q), {"g": g, "omega": omega, "n": 3}, [("dq", q), ("dg", g)])
    args, kwargs, targets = case_module._token_axes(call, 64, 2)
    assert args == [2, 2, 2] and kwargs == {"g": 2, "omega": None} and targets == {"dq": 2, "dg": 2}
    for bad in (torch.zeros(1, 64, 2), torch.zeros(64, 64)):
        with pytest.raises(ValueError, match="g: token axis"):
            case_module._token_axes(case_module.Call((q, q, q), {"g": bad}), 64, 2)
    param = torch.zeros(64, 8, requires_grad=True)
    with pytest.raises(ValueError, match="dparam0"):
        case_module._token_axes(case_module.Call((q, q, q), {}, [("dparam0", param)]), 64, 2)


def test_grad_prefix_min_comes_from_the_config_and_chunk_is_checked():
    from attnbench.execute.runner import worker_options

    assert worker_options({"timing": TIMING, "correctness": {"grad_prefix_min": 256}})["grad_prefix_min"] == 256
    assert worker_options({"timing": TIMING})["grad_prefix_min"] == case_module.GRAD_PREFIX_MIN == 1024
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="Prepared.chunk"):
            Prepared(fn=lambda q, k, v: q, chunk=bad)
