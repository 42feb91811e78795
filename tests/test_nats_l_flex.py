"""NAtS-L's softmax branch as block-sparse FlexAttention (``method_options.nats_l.softmax=flex``): the same values
and gradients (q, k, v and the router's straight-through gradient) as the dense multiplicative form, the block
lists are the pattern's blocks, causality, negative controls (``fault=``), the options, the reference's
``rows=`` form and its cap.

The CPU has no FlexAttention backward and no compiled log-sum-exp (torch 2.13), so the flex form runs here with
the primitive's written-out contract (``nats_l.block_attend_scored``: block lists honoured, score_mod applied),
as tests/test_sparse_methods.py does for the sparse methods; one test checks that contract against the compiled
CPU kernel's forward (which honours the block lists)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute.case import CaseRunner
from attnbench.methods.hybrid import nats_l
from attnbench.methods.registry import Unsupported

from test_linear_methods import _build, _close, _grads, _rand


@pytest.fixture
def contract(monkeypatch):
    """The written-out FlexAttention contract in place of the compiled kernel, and a small flex block."""
    monkeypatch.setattr(nats_l, "ATTEND", nats_l.block_attend_scored)
    monkeypatch.setattr(nats_l, "FLEX_BLOCK", 8)


def _routing(batch, heads, n, seed, bias=0.0):
    """Straight-through routing ``m_sm`` (as ``nats_l.route``) from leaf logits; ``bias`` > 0 favours softmax."""
    logits = _rand(batch, heads, n, 2, seed=seed).double()
    logits[..., 0] += bias
    logits.requires_grad_(True)
    soft = torch.softmax(logits, -1)
    hard = F.one_hot(logits.argmax(-1), 2).to(soft.dtype)
    return logits, (hard + soft - soft.detach())[..., 0]


def _branch_grads(length, block, flex_block, bias=0.0, fault=None, seed=0):
    """(dense, flex) results: output and the gradients of q, k, v and the router's logits, in fp64."""
    q, k, v = (_rand(2, 2, length, 8, seed=seed + s).double().requires_grad_(True) for s in (1, 2, 3))
    logits, m_sm = _routing(2, 2, length // block, seed + 4, bias)
    dout = _rand(2, 2, length, 8, seed=seed + 5).double()
    results = []
    for form in ("dense", "flex"):
        if form == "dense":
            out = nats_l.softmax_branch(q, k, v, m_sm, block)
        else:
            out = nats_l.softmax_branch_flex(q, k, v, m_sm, block, nats_l.block_attend_scored, flex_block, fault)
        results.append((out, *torch.autograd.grad(out, (q, k, v, logits), dout, retain_graph=True)))
    return results, m_sm


# (length, routing chunk, flex block): flex block a multiple of the chunk, the chunk a multiple of the flex block,
# a length no multiple of the flex block, the real sizes (64 / 128) at 320 = 2.5 flex blocks, and 200 (no multiple
# of 64 or 128: the method's fit takes chunk 8 there)
SMALL = [(48, 4, 8), (40, 8, 16), (64, 16, 8)]
SHAPES = SMALL + [(320, 64, 128), (200, 8, 128)]
ROUTINGS = {"some": 0.0, "none_routed": -30.0, "all_routed": 30.0}


@pytest.mark.parametrize("length, block, flex_block, bias",
                         [(*s, b) for s in SMALL for b in ROUTINGS.values()] + [(*s, 0.0) for s in SHAPES[3:]],
                         ids=[f"{s[0]}-{s[1]}-{s[2]}-{n}" for s in SMALL for n in ROUTINGS]
                         + [f"{s[0]}-{s[1]}-{s[2]}-some" for s in SHAPES[3:]])
def test_flex_branch_equals_dense_values_and_all_gradients(length, block, flex_block, bias):
    (dense, flex), m_sm = _branch_grads(length, block, flex_block, bias)
    routed = float((m_sm > 0.5).double().mean())
    assert (0 < routed < 1) if bias == 0 else routed == (bias > 0)
    for name, got, want in zip(("out", "dq", "dk", "dv", "drouter"), flex, dense):
        assert _close(got, want, 1e-12), name
    assert dense[4].abs().max() > 0  # the router does get a gradient


@pytest.mark.parametrize("fault", nats_l.FAULTS)
def test_each_fault_is_caught_by_the_equality_test(fault):
    """Negative controls: the same-chunk blocks or the routed blocks dropped from the BlockMask, or the
    complementary pass (the router's gradient on chunks routed away) skipped - each disagrees."""
    (dense, flex), _ = _branch_grads(48, 4, 8, fault=fault)
    assert not all(_close(g, w, 1e-6) for g, w in zip(flex, dense))
    if fault == "no_complement":  # values, q, k, v right: only the router's gradient shows it
        assert all(_close(g, w, 1e-12) for g, w in zip(flex[:4], dense[:4]))
        assert not _close(flex[4], dense[4], 1e-3)


@pytest.mark.parametrize("length, block, flex_block", SHAPES)
def test_block_lists_are_the_patterns_blocks(length, block, flex_block):
    """Listed blocks (full | partial) = the blocks the token pattern touches, full = those it covers entirely
    (positions past the end count as not covered), for the main pass and its complement."""
    routed = torch.rand(2, 3, length // block, generator=torch.Generator().manual_seed(length)) > 0.5
    main_p, main_f, comp_p, comp_f = nats_l.softmax_block_flags(routed, block, length, flex_block)
    t = torch.arange(length)
    chunk = t // block
    earlier = chunk[None, :] < chunk[:, None]
    main = ((chunk[None, :] == chunk[:, None]) & (t[None, :] <= t[:, None])) | (earlier & routed[..., None, chunk])
    comp = earlier & ~routed[..., None, chunk]
    nb = -(-length // flex_block)
    pad = nb * flex_block - length
    for pattern, partial, full in ((main, main_p, main_f), (comp, comp_p, comp_f)):
        tiles = F.pad(pattern, (0, pad, 0, pad)).view(2, 3, nb, flex_block, nb, flex_block)
        covered = F.pad(pattern, (0, pad), value=False)  # key padding breaks coverage, query padding does not
        covered = F.pad(covered, (0, 0, 0, pad), value=True).view(2, 3, nb, flex_block, nb, flex_block)
        assert torch.equal(partial | full, tiles.any(5).any(3))
        assert torch.equal(full, covered.all(5).all(3))
        assert not (partial & full).any()


@pytest.mark.slow  # one inductor compile on the CPU (~10 s)
def test_contract_is_the_compiled_cpu_kernel():
    """``block_attend_scored`` (what the tests swap in) against compiled FlexAttention on the CPU (forward, no
    lse: what the CPU build compiles), at the real sizes (chunk 64, flex block 128, a length of 2.5 flex blocks),
    with the right block lists and with the routed blocks dropped - which the kernel, like the contract, honours."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def kernel(q, k, v, block_mask, score_mod):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask), None

    q, k, v = (_rand(1, 2, 320, 16, seed=s) for s in (1, 2, 3))
    m_sm = (torch.rand(1, 2, 5, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    with torch.no_grad():
        want = nats_l.softmax_branch(q, k, v, m_sm, 64)
        for fault in (None, "drop_routed"):
            got = nats_l.softmax_branch_flex(q, k, v, m_sm, 64, kernel, fault=fault)
            torch.testing.assert_close(got, nats_l.softmax_branch_flex(q, k, v, m_sm, 64, nats_l.block_attend_scored,
                                                                       fault=fault), rtol=1e-5, atol=1e-5)
            assert _close(got, want, 1e-5) == (fault is None)


# ---- the layer ---------------------------------------------------------------------------------------------------
def test_layer_flex_equals_dense_with_every_parameter_gradient(contract):
    dense = _build("nats_l", "causal", 48, 48, params={"block": 4, "softmax": "dense"})
    flex = _build("nats_l", "causal", 48, 48, params={"block": 4, "softmax": "flex"})
    x = _rand(1, 48, 16, seed=3, requires_grad=True)
    got = _grads(lambda x_, *_: flex.fn(x_), x, *flex.parameters)
    want = _grads(lambda x_, *_: dense.fn(x_), x, *dense.parameters)
    assert _close(got[0], want[0], 1e-6)
    assert all(_close(g, w, 1e-5) for g, w in zip(got[1], want[1]))
    route = [i for i, p in enumerate(dense.parameters) if p.shape == (16, 4)][0] + 1  # w_route [width, 2 heads]
    assert want[1][route].abs().max() > 0


def test_layer_flex_does_not_leak(contract):
    prepared = _build("nats_l", "causal", 48, 48, params={"block": 4, "softmax": "flex"})
    x = _rand(1, 48, 16, seed=1)
    x2 = x.clone()
    x2[:, 29:] = _rand(1, 19, 16, seed=2) * 3  # inside a chunk and a flex block
    assert torch.allclose(prepared.fn(x)[:, :29], prepared.fn(x2)[:, :29], atol=1e-6)
    assert not torch.allclose(prepared.fn(x)[:, 29:], prepared.fn(x2)[:, 29:], atol=1e-3)


def _run(mode, opts, seq=64, ref_full_pairs=None):
    spec = masks.make_mask("causal")
    timing = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False}
    options = {"timing": timing, "method_options": {"nats_l": opts}}
    if ref_full_pairs:
        options["ref_full_pairs"] = ref_full_pairs
    case = Case(method="nats_l", mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=seq,
                seq_kv=seq, head_dim=8, dtype="float32", mode=mode, seed=0)
    return CaseRunner("cpu", options).run(case)


def test_harness_gates_flex_against_the_dense_reference(contract, monkeypatch):
    row = _run("fwd_bwd", {"block": 4, "softmax": "flex"})
    assert row["status"] == "ok", row.get("reason")
    # negative control: the routed blocks dropped are a wrong row
    monkeypatch.setattr(nats_l, "softmax_branch_flex",
                        functools.partial(nats_l.softmax_branch_flex, fault="drop_routed"))
    row = _run("fwd_bwd", {"block": 4, "softmax": "flex"})
    assert row["status"] == "wrong", row.get("reason")


def test_long_cases_gate_on_rows_past_max_len(contract):
    """Above ``ref_full_pairs`` the reference runs on sampled rows (``rows=``): a flex case past the dense cap
    is gated, forward, without an [L, L] reference."""
    row = _run("fwd", {"block": 4, "softmax": "flex", "max_len": 32}, seq=64, ref_full_pairs=64 * 64 - 1)
    assert row["status"] == "ok", row.get("reason")


# ---- options and the reference -----------------------------------------------------------------------------------
def test_softmax_option_is_validated_with_its_field():
    with pytest.raises(ValueError, match=r"method_options\.nats_l\.softmax"):
        _build("nats_l", "causal", 32, 32, params={"block": 4, "softmax": "sparse"})


def test_auto_is_dense_up_to_max_len_and_flex_above_on_cuda_only():
    from attnbench.methods.hybrid.nats_l import softmax_form

    assert softmax_form("auto", "cuda", 8192, 8192) == "dense"  # measured faster at 2K on the H200
    assert softmax_form("auto", "cuda", 16384, 8192) == "flex"  # the dense form's cap
    assert softmax_form("auto", "cpu", 16384, 8192) == "dense"  # no compiled flex backward on the CPU
    assert softmax_form("flex", "cuda", 2048, 8192) == "flex" and softmax_form("dense", "cuda", 1 << 20, 8) == "dense"


def test_flex_needs_cuda_and_dense_keeps_its_cap():
    with pytest.raises(Unsupported, match=r"softmax=flex runs on CUDA"):
        _build("nats_l", "causal", 32, 32, params={"block": 4, "softmax": "flex"})
    with pytest.raises(Unsupported, match=r"max_len=16"):
        _build("nats_l", "causal", 32, 32, params={"block": 4, "softmax": "dense", "max_len": 16})
    with pytest.raises(Unsupported, match=r"max_len=16"):  # auto is dense off CUDA
        _build("nats_l", "causal", 32, 32, params={"block": 4, "max_len": 16})


def test_flex_has_no_length_cap_and_the_whole_reference_keeps_it(contract):
    prepared = _build("nats_l", "causal", 32, 32, params={"block": 4, "softmax": "flex", "max_len": 16})
    x = _rand(1, 32, 16, seed=1)
    rows = torch.tensor([0, 5, 17, 31])
    assert prepared.fn(x).shape == (1, 32, 16)
    with pytest.raises(ValueError, match=r"max_len=16.*ref_full_pairs"):
        prepared.reference(x)
    with torch.no_grad():
        assert _close(prepared.reference(x, rows=rows), prepared.fn(x)[:, rows], 1e-5)


@pytest.mark.parametrize("length, block", [(48, 4), (64, 16)])
def test_reference_rows_are_the_whole_reference_at_those_rows(length, block):
    prepared = _build("nats_l", "causal", length, length, params={"block": block})
    x = _rand(1, length, 16, seed=2)
    rows = torch.tensor([0, 3, block, block + 1, length // 2, length - 1])
    with torch.no_grad():
        whole = prepared.reference(x)
        assert _close(prepared.reference(x, rows=rows), whole[:, rows], 1e-6)
        # negative control: the rows' softmax branch with the routing ignored (every chunk visible) disagrees
        q = _rand(1, 2, length, 8, seed=5)
        m_sm = torch.zeros(1, 2, length // block)
        want = nats_l.softmax_branch(q, q, q, m_sm, block)[:, :, rows]
        assert _close(nats_l.softmax_rows(q, q, q, m_sm, block, rows), want, 1e-6)
        assert not _close(nats_l.softmax_rows(q, q, q, torch.ones_like(m_sm), block, rows), want, 1e-3)
