"""Superlinear's memory at long lengths (methods/sparse/superlinear.py) and the forms that bound it, on the CPU.

- ``gates_chunked`` (the gate scores in steps of query rows, an autograd Function keeping only its inputs) gives
  the written-out ``gates``' values and gradients, invalid anchors included; a gather one row off is caught.
- ``query_chunk``: the span attention chunk by chunk of query rows (checkpointed with gradients) equals the
  whole-sequence form, values and gradients, with FlexAttention's contract honouring the BlockMasks' block
  lists (``common.block_attend``, 16-token blocks), and the harness gates it ``ok`` in fwd_bwd and bwd (a held
  graph replayed); a chunk's mask_mod without its row offset is caught. Bad values name the field; ``auto``
  keeps one chunk up to 256K at 16 heads.
- the reference's ``rows=`` form routes the sampled rows only (``search_rows``: the full search is not called)
  and gives the whole reference's rows, ties in the search included; the tie order is seen by the check.
- memory, replayed with a FlexAttention stand-in that allocates and saves what the CUDA kernel does (no values)
  under scripts/linear_memory.py's tracker of live tensor bytes: the bytes autograd saves equal
  ``saved_bytes_model`` exactly, flat per token-head with chunks, growing with the BlockMask lists in one chunk
  (the negative control); at the 1M case's ratios (16 heads, d 128, bf16: block entries per query
  ``L / b^2`` = 64, 8 chunks, ~96 gate steps) the projected 1M peak is well under the H200's memory, and the
  forms before (one chunk, written-out gates) project over 100 GiB.
"""
from __future__ import annotations

import math

import pytest
import torch

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.methods import METHODS, BuildContext, MaskInfo
from attnbench.methods.sparse import common, superlinear

from scriptload import load_script
from test_superlinear_search_triton import run_case as search_run_case


def _memory_tools():
    module = load_script("linear_memory")
    return module.LiveBytes, module.saved_bytes


def build(seq=128, opts=None, heads=2, dim=16, dtype=torch.float32, batch=1):
    spec = masks.make_mask("causal")
    bound = spec.bind(seq, seq)
    case = Case(method="superlinear", mask=spec.label, mask_name=spec.name, batch=batch, heads_q=heads,
                heads_kv=heads, seq_q=seq, seq_kv=seq, head_dim=dim, dtype=str(dtype).replace("torch.", ""),
                mode="fwd", seed=0)
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"), dtype=dtype,
                       options={}, params=dict(opts or {}))
    return METHODS["superlinear"].build(ctx)


def draw(shape, count, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(count)]


def run_case(mode, opts, seq=160):
    return search_run_case(mode, opts, seq=seq)  # the harness on one superlinear case (tiny timing), 160 tokens


# ---- the gates in steps ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, length, budget", [
    (torch.float32, 40, 1),  # one row a step
    (torch.float32, 90, 7 * 2 * 3 * 16),  # 7 rows a step: 13 steps, the last one shorter
    (torch.bfloat16, 90, 7 * 2 * 3 * 16),
    (torch.bfloat16, 90, 1 << 26),  # one step
])
def test_gates_chunked_equal_the_written_out_gates(dtype, length, budget):
    dim, n = 16, 3
    distances = superlinear.stripe_distances(length, 0.5, 0)
    q1, k = draw((1, 2, length, dim), 2, seed=1, dtype=dtype)
    anchors = superlinear.search(q1, k, distances, n)
    assert (anchors == -1).any()  # the first rows have fewer valid stripes than spans
    weights = torch.randn(1, 2, length, n, generator=torch.Generator().manual_seed(2))
    results = []
    for form in (lambda a, b, c: superlinear.gates(a, b, c),
                 lambda a, b, c: superlinear.gates_chunked(a, b, c, budget_elems=budget)):
        a, b = (t.detach().clone().requires_grad_() for t in (q1, k))
        g = form(a, b, anchors)
        results.append((g, *torch.autograd.grad((g * weights).sum(), (a, b))))
    (g0, dq0, dk0), (g1, dq1, dk1) = results
    assert torch.equal(g0, g1)  # the same expression per row
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dq1, dq0, **tol)
    torch.testing.assert_close(dk1, dk0, **tol)  # bf16: one rounding of an fp32 sum vs bf16 scatter_add


def test_a_gather_one_row_off_in_the_gates_is_caught(monkeypatch):
    length, dim = 90, 16
    q1, k = draw((1, 2, length, dim), 2, seed=1)
    anchors = superlinear.search(q1, k, superlinear.stripe_distances(length, 0.5, 0), 3)
    want = superlinear.gates(q1, k, anchors)
    gather = superlinear._gather_keys
    monkeypatch.setattr(superlinear, "_gather_keys",
                        lambda k_, safe: gather(k_, (safe + 1).clamp_max(k_.shape[2] - 1)))
    assert not torch.allclose(superlinear.gates_chunked(q1, k, anchors), want, atol=1e-3)


# ---- the span attention in chunks of query rows ----------------------------------------------------------------
@pytest.fixture
def blocks(monkeypatch):
    """FlexAttention's contract with the block lists honoured (a wrong list is seen) and 16-token blocks, so a
    160-token case has 10 query blocks and chunks of 64 rows cut it in 64, 64, 32."""
    monkeypatch.setattr(common, "ATTEND", common.block_attend)
    monkeypatch.setattr(superlinear, "FLEX_BLOCK", 16)


CHUNK_OPTS = [{}, {"sw_index": 4, "num_spans": 2, "forward_factor": 1.0}]


@pytest.mark.parametrize("opts", CHUNK_OPTS)
def test_chunks_equal_the_whole_sequence_values_and_gradients(blocks, opts):
    length = 160
    q, k, v, q1 = draw((1, 2, length, 16), 4, seed=3)
    dout = draw((1, 2, length, 16), 1, seed=4)[0]
    results = []
    for chunk in (length, 64 if opts else 48):  # whole; 64 + 64 + 32 / 48 x 3 + 16
        prepared = build(length, {**opts, "query_chunk": chunk})
        assert prepared.fn.resolved["query_chunk"] == chunk
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, q1)]
        out = prepared.fn(*leaves[:3], q1=leaves[3])
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
        with torch.no_grad():  # the forward-only form (no checkpoint) too
            torch.testing.assert_close(prepared.fn(q, k, v, q1=q1), out.detach(), rtol=0, atol=0)
    want = build(length, opts).reference(q, k, v, q1)
    torch.testing.assert_close(results[0][0], want, rtol=1e-5, atol=1e-6)
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_chunk_mask_mod_without_its_row_offset_is_caught(blocks, monkeypatch):
    """Negative control: q_idx counts from a chunk's first row; the whole-sequence mask_mod (q_idx as the
    position) cuts the windows of every chunk but the first."""
    length = 160
    q, k, v, q1 = draw((1, 2, length, 16), 4, seed=3)
    opts = {"sw_index": 4, "query_chunk": 64}
    want = build(length, opts).fn(q, k, v, q1=q1)
    whole = superlinear.span_mask_mod
    monkeypatch.setattr(superlinear, "span_mask_mod", lambda lo, hi, sw, qpos=None: whole(lo, hi, sw, None))
    got = build(length, opts).fn(q, k, v, q1=q1)
    assert torch.equal(got[:, :, :64], want[:, :, :64]) and not torch.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("mode", ["fwd_bwd", "bwd"])
def test_a_harness_row_with_chunks_is_ok(blocks, mode):
    """Values and gradients gated against the reference; bwd replays one held graph (retain_graph) through the
    checkpoints."""
    row = run_case(mode, {"query_chunk": 48, "num_spans": 2}, seq=128)
    assert row["status"] == "ok", row["reason"]
    assert row["rel_err"] < 2e-5


@pytest.mark.parametrize("value", [100, 0, -128, "big", True, 64.0])
def test_a_bad_query_chunk_names_the_field(value):
    with pytest.raises(ValueError, match=r"method_options\.superlinear\.query_chunk: must be 'auto' or a positive "
                                         r"multiple of 128"):
        build(opts={"query_chunk": value})


def test_auto_query_chunk_keeps_one_chunk_up_to_256k_at_16_heads(monkeypatch):
    assert [superlinear.auto_query_chunk(1, 16, 1 << e) for e in (12, 16, 18, 19, 20)] == [
        1 << 12, 1 << 16, 1 << 18, 1 << 18, 1 << 17]
    assert superlinear.auto_query_chunk(1, 1, 1 << 20) == 1 << 20  # one head: 2^26 entries, one chunk
    chunk = superlinear.auto_query_chunk(1, 16, 3 << 18)  # 768K: 5 chunks, multiples of 128
    assert chunk % 128 == 0 and math.ceil((3 << 18) / chunk) == 5
    assert 16 * (chunk // 128) * (3 << 18) // 128 <= superlinear.CHUNK_BLOCK_ENTRIES
    monkeypatch.setattr(common, "ATTEND", common.dense_attend)
    assert build(opts={"query_chunk": 1 << 20}).fn.resolved["query_chunk"] == 128  # at most the length


# ---- the reference on sampled rows: those rows routed only -------------------------------------------------------
@pytest.mark.parametrize("ints", [False, True])
def test_search_rows_equal_the_search_at_those_rows(ints):
    """Random scores, and small-integer inputs where most scores tie (the smaller distance first)."""
    length, dim = 150, 8
    gen = torch.Generator().manual_seed(6)
    if ints:
        q1, k = (torch.randint(-1, 2, (1, 2, length, dim), generator=gen).float() for _ in range(2))
    else:
        q1, k = (torch.randn(1, 2, length, dim, generator=gen) for _ in range(2))
    distances = superlinear.stripe_distances(length, 0.5, 1)
    rows = torch.tensor([149, 0, 3, 4, 77, 100, 77])
    for n in (1, 3):
        want = superlinear.search(q1, k, distances, n)[:, :, rows]
        got = superlinear.search_rows(q1, k, distances, n, rows, budget_elems=2 * 2 * len(distances) * dim)
        assert torch.equal(got, want)
    if ints:  # negative control: the tie order is what the check sees (stripes visited the other way round)
        flipped = superlinear.search_rows(q1, k, distances[::-1], 3, rows)
        assert not torch.equal(flipped, want)


def test_the_reference_rows_route_only_those_rows(monkeypatch):
    monkeypatch.setattr(common, "ATTEND", common.dense_attend)
    length = 128
    q, k, v, q1 = draw((1, 2, length, 16), 4, seed=5)
    prepared = build(length, {"sw_index": 4, "forward_factor": 1.0})
    rows = torch.tensor([0, 5, 64, 127])
    whole = prepared.reference(q, k, v, q1)
    monkeypatch.setattr(superlinear, "search", lambda *a: pytest.fail("the whole search ran for sampled rows"))
    with torch.no_grad():
        sampled = prepared.reference(q, k, v, q1, rows=rows)
    torch.testing.assert_close(sampled, whole[:, :, rows], rtol=1e-5, atol=1e-6)


# ---- memory: saved bytes and the replayed peak -------------------------------------------------------------------
def _mask_mod_tensors(fn):
    return [c.cell_contents for c in fn.__closure__ or () if isinstance(c.cell_contents, torch.Tensor)]


class _FlexMemory(torch.autograd.Function):
    """What compiled FlexAttention allocates and keeps on CUDA, values aside: forward ``out`` (q's dtype) and the
    log-sum-exp (fp32 ``[B, H, Lq]``), saving q, k, v, out, lse and ``keep`` (the BlockMask's index tensors, the
    mask_mod's tensors); backward ``delta`` (fp32 ``[B, H, Lq]``, freed) and dq, dk, dv in their dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, *keep):
        out = torch.zeros_like(q)
        lse = torch.zeros(q.shape[:3], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *keep)
        ctx.extra = len(keep)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors[:3]
        delta = torch.zeros(q.shape[:3], dtype=torch.float32)
        del delta
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)) + (None,) * ctx.extra


def flex_memory(q, k, v, block_mask, return_lse=False):
    keep = [t for t in (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.q_num_blocks,
                        block_mask.q_indices) if t is not None]
    return _FlexMemory.apply(q, k, v, *keep, *_mask_mod_tensors(block_mask.mask_mod))


def anchors_only(q1, k, distances, num_spans):
    """What the Triton search allocates: the anchors (int64 ``[B, H, L, n]``), here the n nearest stripes."""
    batch, heads, length, _ = q1.shape
    near = torch.arange(length)[:, None] - torch.tensor(distances[:num_spans])[None, :]
    return near.clamp_min(-1).expand(batch, heads, length, num_spans).contiguous()


def replay(monkeypatch, length, heads, dim, dtype, opts, block, gate_rows, num_spans=3, peaks=True):
    """Bytes per token-head above the inputs (fwd peak without gradients; fwd_bwd peak, the inputs' gradients
    included; kept after the forward) and the bytes autograd saves, of the built fast path on the CPU (without
    ``peaks``: the saved bytes only, no backward)."""
    LiveBytes, saved_bytes = _memory_tools()
    monkeypatch.setattr(common, "ATTEND", flex_memory)
    monkeypatch.setattr(superlinear, "FLEX_BLOCK", block)
    monkeypatch.setattr(superlinear, "GATE_CHUNK_ELEMS", gate_rows * heads * num_spans * dim)
    monkeypatch.setattr(superlinear, "search", anchors_only)
    # the position order unless opts say otherwise: saved_bytes_model describes it (sorted keeps more per span:
    # each span's row order and the gathered q, measured on the H200 at 14.3 / 23.6 GB at 256K fwd / fwd_bwd
    # against 12.2 / 18.8, results/h200-superlinear-sorted, results/h200-superlinear-v2)
    prepared = build(length, {"num_spans": num_spans, "query_order": "natural", **opts}, heads=heads, dim=dim,
                     dtype=dtype)
    q, k, v, q1, dout = draw((1, heads, length, dim), 5, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v, q1)]
    if not peaks:
        return {"saved": saved_bytes(lambda: prepared.fn(q, k, v, q1=q1), leaves)[0]}
    with torch.no_grad(), LiveBytes() as fwd:
        prepared.fn(q, k, v, q1=q1)
    with LiveBytes() as both:
        saved, out = saved_bytes(lambda: prepared.fn(q, k, v, q1=q1), leaves)
        kept = both.now
        torch.autograd.grad(out, leaves, dout)
        del out
    tokens = heads * length
    return {"fwd": fwd.peak / tokens, "fwd_bwd": both.peak / tokens, "kept": kept / tokens, "saved": saved}


def test_saved_bytes_follow_the_model_linear_with_chunks_quadratic_without(monkeypatch):
    """With chunks the bytes kept for the backward are the same per token-head at every length (the model's
    ``(29 n + 1) P + 16 L``); one chunk (no checkpoint: the form without chunks) keeps the BlockMask lists, per
    token-head ``8 n L / b^2`` more at every doubling of L - the quadratic term that made 1M run out."""
    heads, dim, block = 2, 16, 4
    per_token = {}
    for length in (64, 128):
        for chunk in (length // 4, length):
            got = replay(monkeypatch, length, heads, dim, torch.bfloat16, {"query_chunk": chunk}, block, 8,
                         peaks=False)
            want = superlinear.saved_bytes_model(1, heads, length, dim, 2, 3, chunk, block)
            assert got["saved"] == want, (length, chunk)
            per_token[length, chunk < length] = want / (heads * length)
    assert per_token[64, True] == per_token[128, True] == 88 + 16 / heads
    assert per_token[128, False] - per_token[64, False] == 8 * 3 * (128 - 64) / block ** 2


def test_projected_1m_peak_is_well_under_the_h200(monkeypatch):
    """The 1M case (batch 1, 16 heads, d 128, bf16, 3 spans) projected from a replay at 256 tokens with its
    ratios: 2-token blocks (``L / b^2`` = 64 block entries per query and span, as 128-token blocks at 1M),
    8 chunks (``query_chunk: auto`` at 1M). Every tensor of the fast path is a multiple of a token-head, of a
    block entry, of a gate step or of L, so bytes per token-head carry over; the gate steps are 16 rows here
    (1/16 of the rows a step, where 1M takes ~1/96: an overestimate of their transient, and ``index_add_`` is
    slow under the tracker). Measured here: ~0.7 / ~2.3 KB per token-head (fwd / fwd_bwd) above the inputs:
    ~27 / ~55 GiB at 1M with them. Negative control: the form before (one chunk, the written-out gates; its fp32 copies of the span
    outputs aside) projects over 100 GiB."""
    tokens_1m = 16 * (1 << 20)
    row_bytes = 2 * 128  # a bf16 row of d 128

    def project(per):
        return ((per["fwd"] + 4 * row_bytes) * tokens_1m / 2**30,  # q, k, v, q1
                (per["fwd_bwd"] + 5 * row_bytes) * tokens_1m / 2**30)  # and dout

    length = 256
    now = replay(monkeypatch, length, 2, 128, torch.bfloat16, {"query_chunk": length // 8}, 2, length // 16)
    fwd, fwd_bwd = project(now)
    assert fwd < 32 and fwd_bwd < 64, (fwd, fwd_bwd)
    monkeypatch.setattr(superlinear, "gates_chunked", lambda q1, k, anchors: superlinear.gates(q1, k, anchors))
    before = replay(monkeypatch, length, 2, 128, torch.bfloat16, {"query_chunk": length}, 2, length // 16)
    assert project(before)[1] > 100


# ---- query_order: sorted (the rows of each span's call grouped by the span's start) ----------------------------
@pytest.mark.parametrize("opts", [{}, {"query_chunk": 48}, {"sw_index": 4, "num_spans": 2, "forward_factor": 1.0}])
def test_sorted_query_order_equals_natural_values_and_gradients(blocks, opts):
    """The same outputs and gradients (q, k, v, q1) as the position order, through the block lists (block_attend:
    a block list built from unsorted rows would drop keys), whole, in chunks and with a local window."""
    length = 160
    q, k, v, q1 = draw((1, 2, length, 16), 4, seed=5)
    dout = draw((1, 2, length, 16), 1, seed=6)[0]
    results = []
    for order in ("natural", "sorted"):
        prepared = build(length, {**opts, "query_order": order})
        assert prepared.fn.resolved["query_order"] == order
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, q1)]
        out = prepared.fn(*leaves[:3], q1=leaves[3])
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
        with torch.no_grad():
            torch.testing.assert_close(prepared.fn(q, k, v, q1=q1), out.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][0], build(length, opts).reference(q, k, v, q1), rtol=1e-5, atol=1e-6)


def test_sorted_rows_left_in_place_are_caught(blocks, monkeypatch):
    """Negative control: the outputs not scattered back from the sorted order to the positions."""
    length = 160
    q, k, v, q1 = draw((1, 2, length, 16), 4, seed=5)
    want = build(length, {"query_order": "natural"}).fn(q, k, v, q1=q1)
    monkeypatch.setattr(superlinear, "ORDER_FAULT", True)
    got = build(length, {"query_order": "sorted"}).fn(q, k, v, q1=q1)
    assert not torch.allclose(got, want, atol=1e-3)


def test_sorted_order_lists_fewer_tiles(monkeypatch):
    """What the option is for: on random inputs at 4,096 tokens (128-row blocks) the sorted rows' block lists
    hold far fewer tiles than the position order's (the BlockMasks handed to the primitive are counted)."""
    seen = {}

    def counting(q, k, v, block_mask, return_lse=False):
        seen.setdefault(order, 0)
        seen[order] += int(block_mask.kv_num_blocks.sum())
        return common.dense_attend(q, k, v, block_mask, return_lse)

    monkeypatch.setattr(common, "ATTEND", counting)
    length = 4096
    q, k, v, q1 = draw((1, 1, length, 16), 4, seed=7)
    for order in ("natural", "sorted"):
        build(length, {"query_order": order}, heads=1).fn(q, k, v, q1=q1)
    assert seen["sorted"] * 4 < seen["natural"], seen


def test_auto_query_order_is_sorted_without_a_window_and_natural_with_one(blocks):
    """The default (auto) takes the order measured faster on the H200 (sorted, results/h200-superlinear-sorted) where
    it was measured, sw_index 0, and keeps the position order for a local window (sorted scatters the windows)."""
    assert build(160, {}).fn.resolved["query_order"] == "sorted"
    assert build(160, {"sw_index": 4, "num_spans": 2}).fn.resolved["query_order"] == "natural"
    assert build(160, {"query_order": "natural"}).fn.resolved["query_order"] == "natural"


@pytest.mark.parametrize("value", ["random", 1, None])
def test_a_bad_query_order_names_the_field(value):
    with pytest.raises(ValueError, match=r"method_options\.superlinear\.query_order"):
        build(160, {"query_order": value})


@pytest.mark.parametrize("mode", ["fwd_bwd", "bwd"])
def test_a_harness_row_with_sorted_query_order_is_ok(blocks, mode):
    """query_order sorted through the harness: values and gradients gated against the reference, whole and in
    checkpointed chunks (bwd replays one held graph)."""
    for chunk in (128, 48):
        row = run_case(mode, {"query_order": "sorted", "query_chunk": chunk, "num_spans": 2}, seq=128)
        assert row["status"] == "ok", row["reason"]
        assert row["rel_err"] < 2e-5
