"""``search: triton`` of superlinear (methods/sparse/superlinear_search_triton.py: the span search as one Triton
kernel) on the CPU through Triton's interpreter: the kernel's anchors *identical* to the PyTorch
``superlinear.search`` for several lengths (a block of 64 queries not dividing them), head dims (one register
tile, a padded one, two chunks), span counts, search powers and sw_index, the short-t rows' -1 anchors
included; on exact ties (repeated key rows, small-integer inputs where most scores tie), both against a
per-query brute force of the documented rule (higher score first, then the smaller distance); bf16 / fp16 and
strided inputs; the built method with ``search=triton`` equal to ``search=torch`` (routing phase and outputs)
and gated ``ok`` by the harness, while its reference keeps routing with the PyTorch search; negative controls
(``fault=``: the key one row off, the top-k unsorted, a later stripe winning a tie, and the off-by-one kernel
inside the method) caught by the same checks; option errors name the field; without CUDA or the interpreter
the case is ``unsupported``; ``search: auto`` (the default) is ``triton`` on a CUDA device (only named here:
nothing runs there) and ``torch`` on the CPU, also under the interpreter, or where the kernel cannot run
(triton missing, more than 8 spans); ``superlinear_pkg`` refuses ``search`` and ``query_chunk``.

As in tests/test_tril_triton.py, TRITON_INTERPRET=1 must be set before triton is first imported, so unless
pytest itself was started with it, the interpreter tests here skip and tests/test_triton_interpreter.py runs
this file in its child pytest (``TRITON_INTERPRET=1 pytest tests/test_superlinear_search_triton.py`` alone).
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

from interpmark import INTERPRETING, interp  # noqa: E402

from attnbench import masks  # noqa: E402
from attnbench.config.plan import Case  # noqa: E402
from attnbench.execute.case import CaseRunner  # noqa: E402
from attnbench.methods import METHODS, BuildContext, MaskInfo, UnknownOption  # noqa: E402
from attnbench.methods.registry import Unsupported  # noqa: E402
from attnbench.methods.sparse import common, superlinear  # noqa: E402

TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False}


def kernel():
    from attnbench.methods.sparse import superlinear_search_triton

    return superlinear_search_triton


def both(q1, k, length, num_spans, power=0.5, sw_index=0, fault=None):
    """(PyTorch anchors, kernel anchors) for the stripes of (length, power, sw_index)."""
    distances = superlinear.stripe_distances(length, power, sw_index)
    ref = superlinear.search(q1, k, distances, num_spans)
    got = kernel().search(q1, k, torch.tensor(distances, dtype=torch.int32), num_spans, fault=fault)
    return ref, got


def brute_force(q1, k, length, num_spans, power=0.5, sw_index=0):
    """The documented rule per query: valid stripes sorted by (score descending, distance ascending)."""
    distances = superlinear.stripe_distances(length, power, sw_index)
    batch, heads = q1.shape[:2]
    out = torch.full((batch, heads, length, num_spans), -1, dtype=torch.long)
    ties = 0
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                cands = [(float(q1[b, h, t].double() @ k[b, h, t - d].double()), d) for d in distances if t >= d]
                ties += len(cands) - len({s for s, _ in cands})
                for j, (_, d) in enumerate(sorted(cands, key=lambda c: (-c[0], c[1]))[:num_spans]):
                    out[b, h, t, j] = t - d
    return out, ties


# ---- the kernel against the PyTorch search -----------------------------------------------------------------------
SHAPES = [  # length, head dim, num_spans, search_power, sw_index
    (200, 16, 3, 0.5, 0),   # 64-query blocks: the last one partial
    (128, 32, 1, 0.5, 2),   # sw_index > 0: the first stripes skipped; two full blocks
    (130, 20, 5, 1 / 3, 0),  # a padded head dim (20 -> 32), NS padded (5 -> 8), cube-root stripes
    (100, 200, 2, 0.5, 1),  # head dim 200: two 128-wide chunks
    (40, 16, 8, 1.0, 0),    # every distance a stripe (40 stripes), 8 spans
    (9, 16, 4, 0.5, 0),     # shorter than a block: 3 stripes, every row has -1 anchors
]


@interp
@pytest.mark.parametrize("length, dim, num_spans, power, sw_index", SHAPES)
def test_anchors_are_identical_to_the_torch_search(length, dim, num_spans, power, sw_index):
    gen = torch.Generator().manual_seed(length + dim)
    q1, k = (torch.randn(2, 1, length, dim, generator=gen) for _ in range(2))
    ref, got = both(q1, k, length, num_spans, power, sw_index)
    assert got.dtype == torch.long and got.shape == (2, 1, length, num_spans)
    assert torch.equal(got, ref)
    first = superlinear.stripe_distances(length, power, sw_index)[0]
    assert (got[:, :, :first] == -1).all()  # no stripe valid yet
    if num_spans > 1:
        assert (got == -1).any() and (got >= 0).any()  # short-t rows: some anchors invalid, later rows full
        assert (got[:, :, first, 1:] == -1).all() and (got[:, :, first, 0] == 0).all()  # one valid stripe: t - d = 0


@interp
def test_exact_ties_follow_the_rule_in_both_searches():
    """Repeated key rows (float values: the same row scores the same wherever it lies) and small-integer inputs
    (exact fp32 sums: most scores tie): kernel == PyTorch == the brute-force rule (ties: smaller distance first)."""
    gen = torch.Generator().manual_seed(3)
    length, dim = 90, 16
    rows = torch.randn(1, 2, 4, dim, generator=gen)
    k_rep = rows[:, :, torch.randint(0, 4, (length,), generator=gen)]  # 4 distinct rows, repeated
    q1 = torch.randn(1, 2, length, dim, generator=gen)
    q_int = torch.randint(-1, 2, (1, 2, length, dim), generator=gen).float()
    k_int = torch.randint(-1, 2, (1, 2, length, dim), generator=gen).float()
    for q_, k_ in ((q1, k_rep), (q_int, k_int)):
        for num_spans in (2, 4):
            ref, got = both(q_, k_, length, num_spans)
            rule, ties = brute_force(q_, k_, length, num_spans)
            assert ties > 100  # the inputs really tie
            assert torch.equal(ref, rule)
            assert torch.equal(got, rule)


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_strided_inputs(dtype):
    """q1, k in bf16 / fp16 (both searches widen to fp32) and as [B, L, H, D] layouts viewed [B, H, L, D]."""
    gen = torch.Generator().manual_seed(5)
    length, dim = 150, 32
    q1, k = (torch.randn(1, length, 3, dim, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    assert not q1.is_contiguous()
    ref, got = both(q1, k, length, 3, sw_index=1)
    assert torch.equal(got, ref)


# ---- negative controls: each broken kernel is caught by the checks above --------------------------------------
@interp
@pytest.mark.parametrize("fault, ints", [("off_by_one", False), ("no_topk_order", False), ("late_ties", True)])
def test_a_broken_kernel_is_caught(fault, ints):
    gen = torch.Generator().manual_seed(7)
    length, dim = 120, 16
    if ints:  # a later stripe winning a tie shows only where scores tie
        q1, k = (torch.randint(-1, 2, (1, 2, length, dim), generator=gen).float() for _ in range(2))
    else:
        q1, k = (torch.randn(1, 2, length, dim, generator=gen) for _ in range(2))
    ref, good = both(q1, k, length, 3)
    assert torch.equal(good, ref)
    _, bad = both(q1, k, length, 3, fault=fault)
    assert not torch.equal(bad, ref)


def test_the_torch_search_orders_ties_by_distance():
    """The PyTorch search's rule on its own (no interpreter needed): equal scores, the smaller distance first
    (``torch.topk``, which it used before, orders ties arbitrarily on the CPU)."""
    length, dim = 40, 4
    q1 = torch.ones(1, 1, length, dim)
    k = torch.ones(1, 1, length, dim)  # every score is 4: all tie
    distances = superlinear.stripe_distances(length, 0.5, 0)  # 0, 3, 8, 15, 24, 35
    anchors = superlinear.search(q1, k, distances, 3)
    for t in range(length):
        expect = [t - d for d in distances if t >= d][:3]
        assert anchors[0, 0, t].tolist() == expect + [-1] * (3 - len(expect))


# ---- the method ----------------------------------------------------------------------------------------------
@pytest.fixture
def dense(monkeypatch):
    monkeypatch.setattr(common, "ATTEND", common.dense_attend)


def build(method="superlinear", opts=None, seq=128, dim=16):
    spec = masks.make_mask("causal")
    bound = spec.bind(seq, seq)
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=seq,
                seq_kv=seq, head_dim=dim, dtype="float32", mode="fwd", seed=0)
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                       dtype=torch.float32, options={}, params=dict(opts or {}))
    return METHODS[method].build(ctx), case


def run_case(mode, opts, seq=100):
    spec = masks.make_mask("causal")
    options = {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32,
               "method_options": {"superlinear": dict(opts)}}
    case = Case(method="superlinear", mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2,
                seq_q=seq, seq_kv=seq, head_dim=16, dtype="float32", mode=mode, seed=0)
    return CaseRunner("cpu", options).run(case)


@interp
@pytest.mark.parametrize("opts", [{}, {"sw_index": 4, "num_spans": 2, "forward_factor": 1.0}])
def test_the_method_with_search_triton_equals_search_torch(dense, opts):
    gen = torch.Generator().manual_seed(11)
    outs = {}
    for impl in ("torch", "triton"):
        prepared, case = build(opts={**opts, "search": impl}, seq=100)
        q, k, v, q1 = (torch.randn(1, 2, 100, 16, generator=gen.manual_seed(11 + i)) for i in range(4))
        route = prepared.phases["routing"](q, k, v, q1)
        outs[impl] = (route, prepared.fn(q, k, v, q1), prepared.reference(q, k, v, q1))
    for a, b in zip(outs["torch"][0], outs["triton"][0]):
        assert torch.equal(a, b)  # anchors, span starts and ends, window starts
    assert torch.equal(outs["torch"][1], outs["triton"][1])
    assert torch.equal(outs["torch"][2], outs["triton"][2])


@interp
def test_the_reference_routes_with_the_torch_search(dense, monkeypatch):
    """search=triton: fn and the routing phase call the kernel, the reference (the gate) the PyTorch search."""
    calls = []
    torch_search = superlinear.search
    monkeypatch.setattr(superlinear, "search", lambda *a: calls.append("torch") or torch_search(*a))
    prepared, case = build(opts={"search": "triton"})
    q, k, v, q1 = (torch.randn(1, 2, 128, 16) for _ in range(4))
    prepared.fn(q, k, v, q1)
    prepared.phases["routing"](q, k, v, q1)
    assert calls == []
    prepared.reference(q, k, v, q1)
    assert calls == ["torch"]


@interp
def test_a_harness_row_with_search_triton_is_ok(dense):
    """fwd_bwd: values and gradients gated against the reference (PyTorch routing), the leak probe, the phases."""
    row = run_case("fwd_bwd", {"search": "triton", "num_spans": 2})
    assert row["status"] == "ok", row["reason"]
    assert row["rel_err"] < 2e-5


@interp
def test_an_off_by_one_kernel_in_the_method_is_wrong(dense, monkeypatch):
    """The gate routes with the PyTorch search, so a wrong kernel inside the fast path is a ``wrong`` row."""
    module = kernel()
    good = module.search
    monkeypatch.setattr(module, "search", lambda *a, **kw: good(*a, **kw, fault="off_by_one"))
    row = run_case("fwd", {"search": "triton", "num_spans": 2})
    assert row["status"] == "wrong", row


# ---- options -------------------------------------------------------------------------------------------------------
def test_a_bad_search_value_names_the_field():
    with pytest.raises(ValueError, match=r"method_options\.superlinear\.search: must be one of auto, torch, "
                                         r"triton, got 'cuda'"):
        build(opts={"search": "cuda"})
    # checked before a value that does not fit the case is refused (99 spans at seq 128: unsupported)
    with pytest.raises(ValueError, match=r"method_options\.superlinear\.search"):
        build(opts={"search": "cuda", "num_spans": 99})


def _resolved(device, opts=None, seq=128):
    """``read_options``' resolved search for a case on ``device`` (nothing runs there: a CUDA device is only
    named, so the choice is tested without one)."""
    spec = masks.make_mask("causal")
    bound = spec.bind(seq, seq)
    case = Case(method="superlinear", mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2,
                seq_q=seq, seq_kv=seq, head_dim=16, dtype="float32", mode="fwd", seed=0)
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device(device),
                       dtype=torch.float32, options={}, params=dict(opts or {}))
    return superlinear.read_options(ctx, "superlinear")["search"]


def test_search_auto_is_triton_on_cuda_and_torch_elsewhere(monkeypatch):
    """``auto`` (the default): the measured-faster Triton search where it runs (a CUDA device), PyTorch
    elsewhere - also under TRITON_INTERPRET=1 on the CPU (the interpreter is for tests, not a fast path)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, as far as torch says
    assert _resolved("cpu") == "torch"
    assert _resolved("cpu", {"search": "auto"}) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _resolved("cpu") == "torch"
    assert _resolved("cuda") == "triton" and _resolved("cuda", {"search": "auto"}) == "triton"
    # explicit values are kept
    assert _resolved("cuda", {"search": "torch"}) == "torch"
    assert _resolved("cpu", {"search": "triton"}) == "triton"  # the interpreter runs it
    # negative controls: where the kernel cannot run, auto does not pick it
    assert _resolved("cuda", {"num_spans": 9}, seq=256) == "torch"  # more spans than its registers hold
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert _resolved("cuda") == "torch"  # triton not installed


def test_the_default_search_on_the_cpu_does_not_call_the_kernel(dense, monkeypatch):
    """The built method on the CPU (the default options): fn and the routing phase search with PyTorch, and
    ``fn.resolved`` says so."""
    module = kernel()
    monkeypatch.setattr(module, "search", lambda *a, **kw: pytest.fail("the Triton search was called"))
    prepared, case = build(seq=128)
    assert prepared.fn.resolved["search"] == "torch"
    q, k, v, q1 = (torch.randn(1, 2, 128, 16) for _ in range(4))
    prepared.fn(q, k, v, q1)
    prepared.phases["routing"](q, k, v, q1)


def test_too_many_spans_for_the_kernel_names_the_field(dense):
    with pytest.raises(ValueError, match=r"method_options\.superlinear\.num_spans: must be <= 8 with "
                                         r"method_options\.superlinear\.search=triton"):
        build(opts={"search": "triton", "num_spans": 9}, seq=256)
    build(opts={"search": "torch", "num_spans": 9}, seq=256)  # the PyTorch search takes any count


def test_without_cuda_or_interpreter_the_case_is_unsupported(dense, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(Unsupported, match=r"method_options\.superlinear\.search=triton: .*TRITON_INTERPRET=1"):
        build(opts={"search": "triton"})
    build(opts={"search": "torch"})  # the PyTorch search needs neither
    assert build()[0].fn.resolved["search"] == "torch"  # nor the default (auto) on the CPU


def test_superlinear_pkg_refuses_search():
    """The package routes with its own search kernel and attends with its own span kernel: ``search`` and
    ``query_chunk`` are not its options (refused before the builder runs, so also where the package is not
    installed)."""
    for key, value in (("search", "torch"), ("query_chunk", 128)):
        assert key in METHODS["superlinear"].options and key not in METHODS["superlinear_pkg"].options
        with pytest.raises(UnknownOption, match=rf"method_options\.superlinear_pkg\.{key}: not an option of "
                                                r"superlinear_pkg"):
            build("superlinear_pkg", opts={key: value})
