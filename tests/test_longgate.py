"""The gate at long lengths: the sampled-rows references cost O(rows x keys) (exact) or O(rows x keys seen)
(the methods' own), and give what the whole references give on those rows.

- ``exact.reference.attend_rows`` (every sampled row at once, keys in blocks, the mask from one vectorised
  ``mask_mod`` call) equals the materialised ``reference_attention`` on the rows, for masks with empty rows,
  GQA and budgets that force many key blocks and row groups; a block it forgot is caught.
- ``common.pattern_reference(rows=...)`` (no autograd: the union of the keys a chunk's rows see, in key
  blocks) equals the written-out form's rows for every sparse method's own reference; a dropped key column
  is caught.
- ``biformer_layer``'s reference takes ``rows=`` and the runner gates a layer on sampled rows (a 1 % error
  is ``wrong``, as for q/k/v methods).
- the runner's rows path still says ``wrong`` for an exact method that is 1 % off or ignores the causal mask.
"""
from __future__ import annotations

import pytest
import torch

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute.case import CaseRunner
from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared
from attnbench.methods.exact import reference as exact_reference
from attnbench.methods.sparse import biformer, common

TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False}


def _qkv(batch, heads_q, heads_kv, seq_q, seq_kv, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads_q, seq_q, dim, generator=gen),
            torch.randn(batch, heads_kv, seq_kv, dim, generator=gen),
            torch.randn(batch, heads_kv, seq_kv, dim, generator=gen))


# ---- the exact reference on sampled rows -----------------------------------------------------------------------
EXACT_MASKS = [
    ("causal", 300, 300),
    ("causal", 300, 200),  # bottom-right: the first 100 queries see no key
    ("full", 200, 330),
    ({"name": "sliding_window", "left": 50, "right": 20}, 300, 300),
    ({"name": "document", "lengths": [37, 200, 63]}, 300, 300),
]


@pytest.mark.parametrize("mask,seq_q,seq_kv", EXACT_MASKS)
@pytest.mark.parametrize("chunk_bytes", [1 << 29, 3 * 4 * 2 * 4 * 128])  # one block; 128-key blocks, rows one by one
def test_attend_rows_equals_the_materialised_reference_on_those_rows(mask, seq_q, seq_kv, chunk_bytes):
    bound = masks.make_mask(mask).bind(seq_q, seq_kv)
    q, k, v = _qkv(2, 4, 2, seq_q, seq_kv, 16)  # GQA: 2 query heads per kv head
    want, _ = exact_reference.reference_attention(q, k, v, bound)
    rows = torch.tensor([seq_q - 1, 0, 5, 170, 5, seq_q // 2, 99])  # any order, a repeat
    got = exact_reference.attend_rows(q.bfloat16(), k.bfloat16(), v.bfloat16(), bound, rows, chunk_bytes=chunk_bytes)
    want_bf16, _ = exact_reference.reference_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bound)
    torch.testing.assert_close(got, want_bf16[:, :, rows], atol=2e-6, rtol=2e-5)
    got32 = exact_reference.attend_rows(q, k, v, bound, rows, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(got32, want[:, :, rows], atol=2e-6, rtol=2e-5)
    empty = bound.row_counts()[rows] == 0
    assert bool((got32[:, :, empty] == 0).all())


def test_key_blocks_really_split_and_a_forgotten_block_is_caught(monkeypatch):
    """Negative control: the blocked softmax with its last key block left out of the second pass differs from
    the materialised reference (so the equality above is not vacuous); the budget used does make blocks."""
    bound = masks.make_mask("causal").bind(300, 300)
    q, k, v = _qkv(1, 2, 2, 300, 300, 8)
    rows = torch.tensor([0, 150, 299])
    want, _ = exact_reference.reference_attention(q, k, v, bound)
    budget = 3 * 4 * 1 * 2 * 3 * 128  # 128-key blocks: three of them
    assert exact_reference.key_block(1, 2, 3, budget) == 128
    original = exact_reference.softmax_in_key_blocks

    def forgetful(q_rows, n_keys, keys, values, visible, scale, block):
        return original(q_rows, min(n_keys, 2 * block), keys, values, visible, scale, block)

    monkeypatch.setattr(exact_reference, "softmax_in_key_blocks", forgetful)
    broken = exact_reference.attend_rows(q, k, v, bound, rows, chunk_bytes=budget)
    assert torch.allclose(broken[:, :, :2], want[:, :, rows[:2]], atol=1e-5)  # rows that only see blocks 0-1
    assert not torch.allclose(broken[:, :, 2], want[:, :, 299], atol=1e-3)


# ---- the methods' own references on sampled rows ---------------------------------------------------------------
OWN = [  # method, mask, seq, options (tiny shapes, several chunks and key blocks under the budget below)
    ("halo", "full", 128, {"block": 16, "halo": 8}),
    ("halo", "causal", 128, {"block": 16, "halo": 24, "mask_padding": False}),
    ("halo_2d", "full", 144, {"block": 4, "halo": 2}),
    ("long_short", "causal", 128, {"window": 16, "rank": 4}),
    ("long_short", "full", 128, {"window": 16, "rank": 4}),
    ("combiner_fixed", "causal", 128, {"segment": 16}),
    ("combiner_axial", "full", 128, {"segment": 16}),
    ("combiner_axial", "causal", 128, {"segment": 16}),
    ("combiner_logsparse", "causal", 128, {}),
    ("biformer", "causal", 128, {"region": 16, "topk": 3}),
    ("biformer", "full", 128, {"region": 16, "topk": 3}),
    ("biformer_2d", "full", 144, {"regions_per_side": 4, "topk": 5}),
    ("routing", "causal", 128, {"clusters": 8}),
    ("superlinear", "causal", 128, {"num_spans": 2}),
    ("sparsifiner", "full", 128, {"keep_rate": 0.25}),
    ("probsparse", "full", 128, {}),
]


def _prepared(method, mask, seq, opts, heads=2, dim=8, batch=2):
    spec = masks.make_mask(mask)
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=batch, heads_q=heads, heads_kv=heads,
                seq_q=seq, seq_kv=seq, head_dim=dim, dtype="float32", mode="fwd", seed=0)
    bound = spec.bind(seq, seq)
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                       dtype=torch.float32, options={"method_options": {method: opts}}, params=dict(opts))
    return case, as_prepared(METHODS[method].build(ctx))


def _own_inputs(case, prepared):
    q, k, v = _qkv(case.batch, case.heads_q, case.heads_kv, case.seq_q, case.seq_kv, case.head_dim, seed=3)
    kwargs = {}
    gen = torch.Generator().manual_seed(5)
    for name, extra in prepared.extras.items():
        kwargs[name] = extra.make(gen, torch.device("cpu"), torch.float32)
    if prepared.prepare is not None:
        kwargs.update(prepared.prepare(q, k, v, **kwargs) or {})
    return (q, k, v), kwargs


@pytest.mark.parametrize("method,mask,seq,opts", OWN, ids=[f"{m}-{k}" for m, k, _, _ in OWN])
def test_own_reference_rows_equal_the_whole_references_rows(monkeypatch, method, mask, seq, opts):
    monkeypatch.setattr(common, "ATTEND", common.dense_attend)  # builds without compiled FlexAttention
    monkeypatch.setattr(common, "REF_BUDGET_ELEMS", 3 * 2 * 2 * 128)  # many chunks, 128-key blocks
    case, prepared = _prepared(method, mask, seq, opts)
    args, kwargs = _own_inputs(case, prepared)
    rows = torch.linspace(0, seq - 1, 23).round().long().unique()
    with torch.no_grad():
        whole = prepared.reference(*args, **kwargs)
        sampled = prepared.reference(*args, rows=rows, **kwargs)
    torch.testing.assert_close(sampled, whole[:, :, rows], atol=1e-5, rtol=1e-4)


def test_own_reference_rows_use_only_the_keys_the_rows_see_and_a_dropped_column_is_caught(monkeypatch):
    """The rows path gathers the union of visible columns (a halo row at position 0 sees 24 of 128 keys);
    negative control: dropping the last column of that union changes the rows' outputs."""
    q, k, v = _qkv(1, 2, 2, 128, 128, 8)
    seen = []
    original = exact_reference.softmax_in_key_blocks

    def spy(q_rows, n_keys, *rest):
        seen.append(n_keys)
        return original(q_rows, n_keys, *rest)

    monkeypatch.setattr(exact_reference, "softmax_in_key_blocks", spy)
    keys = torch.arange(128)
    allowed = lambda idx: ((keys[None, :] >= idx[:, None] // 16 * 16 - 8)  # noqa: E731
                           & (keys[None, :] < idx[:, None] // 16 * 16 + 24))[None, None]
    rows = torch.tensor([0, 1])
    with torch.no_grad():
        got = common.pattern_reference(q, k, v, allowed, rows)
    whole = common.pattern_reference(q, k, v, allowed)
    torch.testing.assert_close(got, whole[:, :, rows], atol=1e-6, rtol=1e-5)
    assert seen == [24]

    def drop_last(q_rows, n_keys, *rest):
        return original(q_rows, n_keys - 1, *rest)

    monkeypatch.setattr(exact_reference, "softmax_in_key_blocks", drop_last)
    with torch.no_grad():
        broken = common.pattern_reference(q, k, v, allowed, rows)
    assert not torch.allclose(broken, whole[:, :, rows], atol=1e-4)


def test_rows_path_is_the_written_out_form_under_autograd():
    """With autograd on (a reference's gradients) the rows= form stays the differentiable written-out one."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 1, 1, 32, 32, 4))
    keys = torch.arange(32)
    causal = lambda idx: (keys[None, :] <= idx[:, None])[None, None]  # noqa: E731
    out = common.pattern_reference(q, k, v, causal, torch.tensor([3, 31]))
    out.sum().backward()
    assert k.grad is not None and bool(k.grad[:, :, :32].abs().sum() > 0)


# ---- the layer form on sampled rows ----------------------------------------------------------------------------
LAYER_OPTS = {"regions_per_side": 4, "topk": 4}


def _run(method, mask, mode, seq, opts, ref_full_pairs=None, heads=2, dim=16, batch=2):
    spec = masks.make_mask(mask)
    options = {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32,
               "method_options": {method: dict(opts)}}
    if ref_full_pairs:
        options["ref_full_pairs"] = ref_full_pairs
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=batch, heads_q=heads, heads_kv=heads,
                seq_q=seq, seq_kv=seq, head_dim=dim, dtype="float32", mode=mode, seed=0)
    return CaseRunner("cpu", options).run(case)


def test_biformer_layer_reference_rows_equal_its_whole_references_rows():
    case, prepared = _prepared("biformer_layer", "full", 144, LAYER_OPTS, dim=8)
    x = torch.randn(2, 144, 16, generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([0, 13, 77, 143])
    with torch.no_grad():
        whole = prepared.reference(x)
        sampled = prepared.reference(x, rows=rows)
    assert sampled.shape == (2, 4, 16)
    torch.testing.assert_close(sampled, whole[:, rows], atol=1e-5, rtol=1e-4)


def test_a_layer_is_gated_on_sampled_rows_and_a_wrong_one_is_caught(monkeypatch):
    calls = []
    original = biformer.bra_reference

    def spy(*args, **kwargs):
        calls.append(args[6] if len(args) > 6 else kwargs.get("rows"))
        return original(*args, **kwargs)

    monkeypatch.setattr(biformer, "bra_reference", spy)
    row = _run("biformer_layer", "full", "fwd", 144, LAYER_OPTS, ref_full_pairs=1000)
    assert row["status"] == "ok", row["reason"]
    assert calls and calls[-1] is not None  # the reference ran on the sampled rows (all 144 of them here)
    assert 0 in calls[-1].tolist() and 143 in calls[-1].tolist()
    fast = biformer.bra_fast
    monkeypatch.setattr(biformer, "bra_fast", lambda *a: fast(*a) * 1.01)
    row = _run("biformer_layer", "full", "fwd", 144, LAYER_OPTS, ref_full_pairs=1000)
    assert row["status"] == "wrong" and "rel_err" in row["reason"]


# ---- the runner's exact rows path still catches bugs ---------------------------------------------------------
def test_exact_rows_gate_passes_a_correct_method_and_catches_an_error_and_a_leak(monkeypatch):
    row = _run("sdpa_math", "causal", "fwd", 256, {}, ref_full_pairs=1000)
    assert row["status"] == "ok", row["reason"]
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: sdpa(*a, **kw) * 1.01)
    row = _run("sdpa_math", "causal", "fwd", 256, {}, ref_full_pairs=1000)
    assert row["status"] == "wrong" and "rel_err" in row["reason"]

    def no_mask(q, k, v, *args, attn_mask=None, is_causal=False, **kw):  # sees the future
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_mask)
    row = _run("sdpa_math", "causal", "fwd", 256, {}, ref_full_pairs=1000)
    assert row["status"] == "wrong", row["reason"]


def test_a_pattern_method_is_gated_on_sampled_rows_and_a_wider_window_is_caught(monkeypatch):
    """halo through the runner above ref_full_pairs: its own reference's rows path passes the right fast path;
    a fast path whose windows are one halo wider (sees keys its pattern hides) is ``wrong`` there."""
    from attnbench.methods.sparse import halo

    opts = {"block": 16, "halo": 8, "impl": "gather"}
    row = _run("halo", "causal", "fwd", 128, opts, ref_full_pairs=1000)
    assert row["status"] == "ok", row["reason"]
    fast = halo.halo_1d_fast
    monkeypatch.setattr(halo, "halo_1d_fast",
                        lambda q, k, v, block, width, *rest: fast(q, k, v, block, 2 * width, *rest))
    row = _run("halo", "causal", "fwd", 128, opts, ref_full_pairs=1000)
    assert row["status"] == "wrong" and "rel_err" in row["reason"]  # the gate, before the leak probe
