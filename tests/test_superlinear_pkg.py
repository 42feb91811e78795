"""``superlinear_pkg``: the superlinear package as a second backend of ``superlinear`` (same operator).

The package runs on CUDA only (its Triton kernels assert CUDA and do not run under TRITON_INTERPRET), so on the
CPU: the unavailable path (package blocked -> ``unsupported`` rows naming it), the option mapping, and - where the
package is importable from /tmp/sl (``pip install --target /tmp/sl`` of shared/device/wheels/superlinear-*.whl) -
its own PyTorch search against ours, the method's reference (routing from the package) against the own one, the
0.1.0 defect of the package's MHA prefill that makes ``fn`` call ``prefill_gqa``, and that call's options.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys

import pandas as pd
import pytest
import torch

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute.runner import run_sweep
from attnbench.methods import METHODS, BuildContext, MaskInfo
from attnbench.methods.registry import Unsupported
from attnbench.methods.sparse import superlinear, superlinear_pkg

PKG_DIR = "/tmp/sl"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _ctx(method, seq=64, opts=None, dim=16):
    spec = masks.make_mask("causal")
    bound = spec.bind(seq, seq)
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=seq,
                seq_kv=seq, head_dim=dim, dtype="float32", mode="fwd", seed=0)
    return BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                        dtype=torch.float32, options={}, params=dict(opts or {}))


@pytest.fixture
def blocked(monkeypatch):
    monkeypatch.setitem(sys.modules, "superlinear", None)  # find_spec -> None: "not importable"


def test_blocked_package_makes_the_method_unavailable(blocked):
    ok, why = METHODS["superlinear_pkg"].availability()
    assert not ok and "'superlinear'" in why


def test_blocked_package_gives_unsupported_rows_naming_it(blocked, cfg):
    cfg.update(methods=["superlinear_pkg", "superlinear"], masks=["causal"], seq_lens=[64], heads_q=2, head_dim=8)
    frame = pd.read_parquet(run_sweep(cfg, "test", show_progress=False) / "rows.parquet").set_index("method")
    row = frame.loc["superlinear_pkg"]
    assert row.status == "unsupported" and "superlinear" in row.reason and "importable" in row.reason
    assert "importable" not in frame.loc["superlinear"].reason  # the own method is not blocked by it


def test_capabilities_are_causal_cuda_with_backward():
    caps = METHODS["superlinear_pkg"].caps
    assert caps.causal_only and caps.masks == {"causal"} and caps.devices == ("cuda",)
    assert caps.backward and not caps.cross and not caps.gqa and not caps.exact
    assert "superlinear" in caps.requires


@pytest.mark.parametrize("opts, words", [
    ({"num_spans": 1}, "2 or 3"), ({"num_spans": 4}, "2 or 3"), ({"search_power": 1.0}, "(0, 1)"),
    ({"backward_factor": 0.0}, "backward_factor"), ({"forward_factor": 1.0, "span_power": 1.0}, "span_power"),
])
def test_options_the_package_cannot_express_are_unsupported(opts, words):
    cfg = superlinear.read_options(_ctx("superlinear_pkg", opts=opts), "superlinear_pkg")
    with pytest.raises(Unsupported, match=words.replace("(", r"\(").replace(")", r"\)")):
        superlinear_pkg.package_kwargs(cfg)


@pytest.mark.parametrize("power, expect", [(0.5, {"inv_search_power_int": 2, "search_power": None}),
                                           (1 / 3, {"inv_search_power_int": 3, "search_power": None}),
                                           (0.55, {"inv_search_power_int": None, "search_power": 0.55})])
def test_search_power_maps_to_the_packages_integer_or_float_path(power, expect):
    cfg = superlinear.read_options(_ctx("superlinear_pkg", seq=256, opts={"search_power": power}), "superlinear_pkg")
    got = superlinear_pkg.package_kwargs(cfg)
    assert {n: got[n] for n in expect} == expect
    assert got["sw_index"] == 0 and got["num_spans"] == 3 and got["backward_factor"] == 2.0  # same defaults


def test_bad_options_fail_naming_the_field():
    with pytest.raises(ValueError, match="method_options.superlinear_pkg.sw_index"):
        superlinear.read_options(_ctx("superlinear_pkg", opts={"sw_index": -1}), "superlinear_pkg")


# ---- with the package importable (its PyTorch search runs on the CPU) -----------------------------------------
@pytest.fixture
def package(monkeypatch):
    if not os.path.isdir(os.path.join(PKG_DIR, "superlinear")) and importlib.util.find_spec("superlinear") is None:
        pytest.skip(f"superlinear package not importable (pip install --target {PKG_DIR} its wheel)")
    monkeypatch.syspath_prepend(PKG_DIR)
    pytest.importorskip("superlinear")


OPTION_SETS = [{}, {"sw_index": 4, "num_spans": 2, "forward_factor": 1.0},
               {"sw_index": 2, "backward_factor": 3.0, "forward_factor": 1.0, "span_power": 0.55}]


def _inputs(seq, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, seq, dim, generator=gen) for _ in range(4)]


def _own_routing(cfg):
    def routing(q1, k):
        anchors = superlinear.search(q1, k, cfg["distances"], cfg["num_spans"])
        return (anchors, *superlinear.span_bounds(anchors, cfg["window"], cfg["backward_factor"],
                                                  cfg["forward_factor"], cfg["span_power"]))
    return routing


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_package_search_is_the_own_search(package, opts):
    seq = 100  # not a perfect square: no fp32-vs-float64 ceil boundary at the last rows either way
    cfg = superlinear.read_options(_ctx("superlinear_pkg", seq=seq, opts=opts), "superlinear_pkg")
    kwargs = superlinear_pkg.package_kwargs(cfg)
    q, k, v, q1 = _inputs(seq)
    want = _own_routing(cfg)(q1, k)
    got = superlinear_pkg.package_routing(q1, k, torch.arange(seq), kwargs, cfg["window"])
    for name, g, w in zip(("anchors", "start", "end", "sw_start"), got, want):
        assert torch.equal(g, w), name


def test_a_mapping_that_drops_sw_index_is_caught(package):
    """Negative control: the comparison above sees a wrong parameter mapping."""
    seq = 100
    cfg = superlinear.read_options(_ctx("superlinear_pkg", seq=seq, opts=OPTION_SETS[1]), "superlinear_pkg")
    kwargs = {**superlinear_pkg.package_kwargs(cfg), "sw_index": 0}
    q, k, v, q1 = _inputs(seq)
    want = _own_routing(cfg)(q1, k)
    got = superlinear_pkg.package_routing(q1, k, torch.arange(seq), kwargs, cfg["window"])
    assert not all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_the_methods_reference_is_the_own_reference_with_gradients(package, opts):
    seq = 100
    ctx = _ctx("superlinear_pkg", seq=seq, opts=opts)
    prepared = METHODS["superlinear_pkg"].build(ctx)
    cfg = superlinear.read_options(ctx, "superlinear_pkg")
    q, k, v, q1 = (t.requires_grad_() for t in _inputs(seq, seed=1))
    got = prepared.reference(q, k, v, q1)
    want = superlinear.superlinear_reference(q, k, v, q1, _own_routing(cfg))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    weights = torch.linspace(-1, 1, got.numel()).view_as(got)
    g_got = torch.autograd.grad((got * weights).sum(), (q, k, v, q1))
    g_want = torch.autograd.grad((want * weights).sum(), (q, k, v, q1))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert prepared.attended_pairs(q, k, v, q1) > 0


class _Reached(Exception):
    """Raised by a stand-in span kernel once the package's arguments bound to the real kernel's signature."""


def _bind_then_stop(real):
    def stand_in(*args, **kwargs):
        raise _Reached(inspect.signature(real).bind(*args, **kwargs).arguments)  # TypeError if they do not bind
    return stand_in


def _stub_prefill_internals(monkeypatch, mha: bool):
    """The package's prefill with its search and sliding-window kernels stubbed (CUDA only) and its span kernel
    replaced by ``_bind_then_stop`` of the real one: the call reaches the span kernel's argument binding on the
    CPU."""
    from superlinear.kernels.superlinear.attention import _prefill

    suffix = "" if mha else "_gqa"
    monkeypatch.setattr(_prefill, "span_search_with_values" + suffix, lambda *a, **kw: (None, None, None))
    monkeypatch.setattr(_prefill, "compute_qend_from_qanchor", lambda *a, **kw: None)
    monkeypatch.setattr(_prefill, "sliding_window_attention_triton" + suffix, lambda *a, **kw: (None, None))
    name = "fused_span_attention_with_precomputed_sw" + suffix
    monkeypatch.setattr(_prefill, name, _bind_then_stop(getattr(_prefill, name)))


REVISIT = ("the superlinear package's MHA prefill no longer fails as in 0.1.0: revisit superlinear_pkg's use of "
           "prefill_gqa for equal heads (module docstring) and this test")


def test_the_packages_mha_prefill_passes_search_power_its_span_kernel_lacks(package, monkeypatch):
    """Why ``fn`` calls ``prefill_gqa``: in 0.1.0 ``superlinear.prefill`` with equal heads goes to
    ``_prefill.fused_prefill_with_swtriton``, which passes ``search_power=`` to a span kernel without that
    parameter (the H200 TypeError); the GQA entry's span kernel takes it. Fails, naming the revisit, once fixed."""
    import superlinear
    from superlinear.kernels.superlinear.span import _triton_precomputed_sw, _triton_precomputed_sw_gqa

    mha = inspect.signature(_triton_precomputed_sw.fused_span_attention_with_precomputed_sw).parameters
    gqa = inspect.signature(_triton_precomputed_sw_gqa.fused_span_attention_with_precomputed_sw_gqa).parameters
    assert {"search_power", "inv_search_power_int"} <= set(gqa)
    assert "search_power" not in mha, REVISIT
    q1, q, k, v = _inputs(16)  # equal heads: 2 and 2
    opts = dict(cache_position=torch.arange(16), sw_index=0, num_spans=3, backward_factor=2.0, forward_factor=0.0,
                span_power=0.5, search_power=None, inv_search_power_int=2)
    _stub_prefill_internals(monkeypatch, mha=True)
    with pytest.raises((TypeError, _Reached)) as mha_call:  # _Reached: the arguments bound, so it is fixed
        superlinear.prefill(q1, q, k, v, **opts)
    assert mha_call.type is TypeError, REVISIT
    assert "search_power" in str(mha_call.value), mha_call.value
    _stub_prefill_internals(monkeypatch, mha=False)
    with pytest.raises(_Reached) as got:  # the GQA entry, equal heads: its span kernel takes the options
        superlinear.prefill_gqa(q1, q, k, v, **opts)
    bound = got.value.args[0]
    assert bound["inv_search_power_int"] == 2 and bound["search_power"] is None and bound["Q2"] is q


@pytest.mark.parametrize("opts, want", [
    ({}, dict(sw_index=0, num_spans=3, backward_factor=2.0, forward_factor=0.0, span_power=0.5, search_power=None,
              inv_search_power_int=2)),
    ({"sw_index": 2, "num_spans": 2, "backward_factor": 3.0, "forward_factor": 1.0, "span_power": 0.55,
      "search_power": 0.55},
     dict(sw_index=2, num_spans=2, backward_factor=3.0, forward_factor=1.0, span_power=0.55, search_power=0.55,
          inv_search_power_int=None)),
])
def test_fn_calls_the_gqa_entry_with_the_mapped_options(package, monkeypatch, opts, want):
    import superlinear

    seq = 64
    calls = []

    def recorder(*args, **kwargs):
        inspect.signature(superlinear.fused_prefill_with_swtriton_gqa).bind(*args, **kwargs)  # real names only
        calls.append((args, kwargs))
        return torch.zeros_like(args[1])

    def broken(*args, **kwargs):
        raise AssertionError("superlinear.prefill called: its equal-heads path fails in 0.1.0")

    monkeypatch.setattr(superlinear, "prefill_gqa", recorder)
    monkeypatch.setattr(superlinear, "prefill", broken)
    prepared = METHODS["superlinear_pkg"].build(_ctx("superlinear_pkg", seq=seq, opts=opts))
    q, k, v, q1 = _inputs(seq)
    out = prepared.fn(q, k, v, q1)
    assert len(calls) == 1 and out.shape == q.shape
    args, kwargs = calls[0]
    assert len(args) == 4 and all(a is b for a, b in zip(args, (q1, q, k, v)))  # (Q1, Q2, K, V)
    assert torch.equal(kwargs.pop("cache_position"), torch.arange(seq))
    assert kwargs == want


@GPU[0]
@GPU[1]
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_package_passes_its_gate_on_the_gpu(mode):
    pytest.importorskip("superlinear")
    from attnbench.execute.case import CaseRunner

    spec = masks.make_mask("causal")
    case = Case(method="superlinear_pkg", mask=spec.label, mask_name=spec.name, batch=1, heads_q=4, heads_kv=4,
                seq_q=1000, seq_kv=1000, head_dim=64, dtype="bfloat16", mode=mode, seed=0)
    options = {"timing": {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False}}
    row = CaseRunner("cuda", options).run(case)
    assert row["status"] == "ok", row["reason"]


@GPU[0]
@GPU[1]
def test_package_triton_search_agrees_with_the_own_search_on_the_gpu():
    pytest.importorskip("superlinear")
    seq = 4000  # not a perfect square; fp32 ceil boundaries may still move a few spans by one key
    ctx = _ctx("superlinear_pkg", seq=seq)
    cfg = superlinear.read_options(ctx, "superlinear_pkg")
    q, k, v, q1 = (t.cuda().bfloat16() for t in _inputs(seq, dim=64))
    got = superlinear_pkg.package_routing(q1, k, torch.arange(seq, device="cuda"),
                                          superlinear_pkg.package_kwargs(cfg), cfg["window"])
    want = _own_routing(cfg)(q1, k)
    assert torch.equal(got[0], want[0])  # the same anchors
    assert (got[1] - want[1]).abs().max() <= 1  # span starts: at most the fp32 ceil off-by-one
