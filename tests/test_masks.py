"""Property tests: for every registered mask, over random small shapes and parameters, every representation
agrees with the dense mask (evaluated from ``mask_mod``).

Each mask has a case strategy below; a new mask must add one (``test_every_mask_has_a_case_strategy``).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnbench import masks
from attnbench.masks import make_mask
from attnbench.masks.basic import query_offset
from attnbench.masks.document import DISTRIBUTIONS
from attnbench.masks.reference import block_counts_from_dense, dense_from_varlen, layout_flags

MAX_SEQ = 300
BLOCK_SIZES = st.sampled_from([16, 32, 64, 128])
ALIGN = st.sampled_from(["bottom_right", "top_left"])
SEED = st.integers(0, 2**31 - 1)
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _seq(draw, low=1):
    return draw(st.integers(low, MAX_SEQ))


def _cross_lengths(draw):
    seq_q = _seq(draw)
    return seq_q, (_seq(draw) if draw(st.booleans()) else seq_q)


def _packing(draw, seq):
    """Document-splitting parameters valid for ``seq`` tokens: explicit lengths, num_docs or mean_length."""
    mode = draw(st.sampled_from(["lengths", "num_docs", "mean_length"]))
    if mode == "lengths" or seq == 1:
        cuts = sorted(draw(st.sets(st.integers(1, seq - 1), max_size=12))) if seq > 1 else []
        return {"lengths": [b - a for a, b in zip([0, *cuts], [*cuts, seq])]}
    params = {
        "distribution": draw(st.sampled_from(DISTRIBUTIONS)),
        "sigma": draw(st.floats(0.1, 3.0)),
        "alpha": draw(st.floats(0.3, 4.0)),
        "max_share": draw(st.sampled_from([0.1, 0.25, 0.5, 1.0])),
        "seed": draw(SEED),
    }
    if mode == "mean_length":
        return {**params, "mean_length": draw(st.integers(1, 200))}
    fewest = math.ceil(seq / max(1, math.floor(params["max_share"] * seq)))
    return {**params, "num_docs": draw(st.integers(fewest, min(seq, fewest + 30)))}


def _self(draw, params_fn, low=1):
    seq = _seq(draw, low)
    return seq, seq, params_fn(seq)


# name -> strategy body: draw -> (seq_q, seq_kv, params)
CASES = {
    "full": lambda draw: (*_cross_lengths(draw), {}),
    "causal": lambda draw: (*_cross_lengths(draw), {"align": draw(ALIGN)}),
    "decode": lambda draw: (*sorted(_cross_lengths(draw)), {}),
    "prefix_lm": lambda draw: (lambda sq, skv: (sq, skv, {"prefix": draw(st.integers(0, skv)), "align": draw(ALIGN)}))(
        *_cross_lengths(draw)
    ),
    "block_causal": lambda draw: (*_cross_lengths(draw), {"block": draw(st.integers(1, 80)), "align": draw(ALIGN)}),
    "sliding_window": lambda draw: (
        *_cross_lengths(draw),
        {"left": draw(st.integers(0, 320)), "right": draw(st.integers(0, 320)), "align": draw(ALIGN)},
    ),
    "dilated_sliding_window": lambda draw: (
        *_cross_lengths(draw),
        {"left": draw(st.integers(0, 60)), "right": draw(st.integers(0, 60)), "dilation": draw(st.integers(1, 9)),
         "align": draw(ALIGN)},
    ),
    "chunked_local": lambda draw: (*_cross_lengths(draw), {"chunk": draw(st.integers(1, 320)), "align": draw(ALIGN)}),
    "longformer": lambda draw: _self(
        draw, lambda seq: {"left": draw(st.integers(0, 80)), "right": draw(st.integers(0, 80)),
                           "global_tokens": draw(st.integers(0, min(seq, 24)))}
    ),
    "document": lambda draw: _self(draw, lambda seq: {**_packing(draw, seq), "causal": draw(st.booleans())}),
    "document_prefix_lm": lambda draw: _self(draw, lambda seq: _document_prefix(draw, seq)),
    "block_causal_document": lambda draw: _self(
        draw, lambda seq: {**_packing(draw, seq), "frame": draw(st.integers(1, 60))}
    ),
    "shared_question": lambda draw: _self(draw, lambda seq: _shared_question(draw, seq), low=2),
    "bigbird": lambda draw: _self(
        draw, lambda seq: {"block": draw(st.integers(1, 64)), "global_blocks": draw(st.integers(0, 3)),
                           "window_blocks": draw(st.integers(0, 3)), "random_blocks": draw(st.integers(0, 4)),
                           "seed": draw(SEED)}
    ),
    "random_block_sparse": lambda draw: (
        *_cross_lengths(draw),
        {"block": draw(st.integers(1, 64)), "density": draw(st.floats(0.0, 1.0, exclude_min=True)),
         "seed": draw(SEED)},
    ),
    "sparse_strided": lambda draw: (*_cross_lengths(draw), {"stride": draw(st.integers(1, 70)), "align": draw(ALIGN)}),
    "sparse_fixed": lambda draw: (
        *_cross_lengths(draw),
        (lambda stride: {"stride": stride, "summary": draw(st.integers(1, stride)), "align": draw(ALIGN)})(
            draw(st.integers(1, 70))
        ),
    ),
}


def _document_prefix(draw, seq):
    packing = _packing(draw, seq)
    if "lengths" in packing and draw(st.booleans()):
        return {**packing, "prefix_lengths": [draw(st.integers(0, n)) for n in packing["lengths"]]}
    return {**packing, "prefix_fraction": draw(st.floats(0.0, 1.0))}


def _shared_question(draw, seq):
    question = draw(st.integers(1, seq - 1))
    rest = seq - question
    if draw(st.booleans()):
        cuts = sorted(draw(st.sets(st.integers(1, rest - 1), max_size=6))) if rest > 1 else []
        return {"question": question, "answer_lengths": [b - a for a, b in zip([0, *cuts], [*cuts, rest])]}
    return {"question": question, "num_answers": draw(st.integers(1, min(rest, 8)))}


@st.composite
def bound_masks(draw, name):
    seq_q, seq_kv, params = CASES[name](draw)
    return make_mask({"name": name, **params}).bind(seq_q, seq_kv)


BUILTIN = masks.list_masks()


def test_every_mask_has_a_case_strategy():
    assert sorted(CASES) == BUILTIN


# ---- checks, shared with the custom-mask tests ---------------------------------------------------------
def check_dense_forms(bound) -> torch.Tensor:
    """dense == dense_rows == mask_mod (int64 and int32 indices, pointwise); counts; causality. Returns dense."""
    seq_q, seq_kv = bound.seq_q, bound.seq_kv
    dense = bound.dense()
    assert dense.dtype == torch.bool and dense.shape == (seq_q, seq_kv)
    q0, q1 = seq_q // 3, max(seq_q // 3 + 1, 2 * seq_q // 3)
    assert torch.equal(bound.dense_rows(q0, q1), dense[q0:q1])
    picked = torch.randperm(seq_q, generator=torch.Generator().manual_seed(seq_q))[:7].repeat(2)  # any order, repeats
    k0, k1 = seq_kv // 4, max(seq_kv // 4 + 1, 3 * seq_kv // 4)
    assert torch.equal(bound.visible_rows(picked), dense[picked])
    assert torch.equal(bound.visible_rows(picked, k0, k1), dense[picked, k0:k1])
    zero = torch.zeros((), dtype=torch.int32)
    q32, kv32 = torch.arange(seq_q, dtype=torch.int32)[:, None], torch.arange(seq_kv, dtype=torch.int32)[None, :]
    assert torch.equal(bound.mask_mod(zero, zero, q32, kv32).expand(seq_q, seq_kv).bool(), dense)
    generator = torch.Generator().manual_seed(seq_q * 1000 + seq_kv)
    for i, j in zip(torch.randint(seq_q, (20,), generator=generator), torch.randint(seq_kv, (20,), generator=generator)):
        assert bool(bound.mask_mod(zero, zero, i, j)) == bool(dense[i, j]), (int(i), int(j))

    row_counts = bound.row_counts()
    assert row_counts.dtype == torch.int64
    assert torch.equal(row_counts, dense.sum(dim=1))
    pairs = bound.visible_pairs()
    assert isinstance(pairs, int) and pairs == int(dense.sum())
    assert bound.density() == pytest.approx(pairs / (seq_q * seq_kv))
    if bound.spec.causal:
        offset = query_offset(getattr(bound.spec, "align", "bottom_right"), seq_q, seq_kv)
        later = torch.arange(seq_kv)[None, :] > torch.arange(seq_q)[:, None] + offset
        assert not (dense & later).any(), "a causal mask shows a query a later key"
    return dense


def check_block_forms(bound, dense, block_q, block_kv) -> None:
    """block_counts exact; layout lists exactly the touched tiles, full tiles exactly the fully visible ones."""
    expected = block_counts_from_dense(dense, block_q, block_kv)
    assert torch.equal(bound.block_counts(block_q, block_kv), expected)
    layout = bound.block_layout(block_q, block_kv)
    assert (layout.block_q, layout.block_kv) == (block_q, block_kv)
    partial, full = layout_flags(layout)
    area = block_counts_from_dense(torch.ones_like(dense), block_q, block_kv)
    assert torch.equal(partial | full, expected > 0), "layout must cover exactly the tiles with a visible pair"
    assert torch.equal(full, expected == area), "full tiles must be exactly the fully visible ones"
    assert layout.computed_blocks() == int((expected > 0).sum())


def check_block_mask(bound, dense, block_size) -> None:
    block_mask = bound.block_mask(block_size=block_size)
    expected = block_counts_from_dense(dense, block_size, block_size) > 0
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), expected)
    assert tuple(block_mask.seq_lengths) == (bound.seq_q, bound.seq_kv)
    layout = bound.block_layout(block_size, block_size)
    assert torch.equal(block_mask.full_kv_num_blocks[0, 0], layout.full_kv_num_blocks)
    q, kv = torch.arange(bound.seq_q)[:, None], torch.arange(bound.seq_kv)[None, :]
    zero = torch.zeros((), dtype=torch.int64)
    assert torch.equal(block_mask.mask_mod(zero, zero, q, kv).expand_as(dense).bool(), dense)


def check_varlen(bound, dense) -> None:
    form = bound.varlen()
    if form is None:
        return
    assert form.cu_seqlens_q.dtype == torch.int32 and form.cu_seqlens_k.dtype == torch.int32
    assert form.max_seqlen_q == int(form.cu_seqlens_q.diff().max())
    assert form.max_seqlen_k == int(form.cu_seqlens_k.diff().max())
    assert torch.equal(dense_from_varlen(form, bound.seq_q, bound.seq_kv), dense)


# ---- properties, per registered mask ---------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN)
def test_dense_forms_and_counts_agree(name):
    @PROPERTY_SETTINGS
    @given(bound=bound_masks(name))
    def run(bound):
        dense = check_dense_forms(bound)
        again = bound.spec.bind(bound.seq_q, bound.seq_kv)  # random masks are deterministic
        assert torch.equal(again.dense(), dense)

    run()


@pytest.mark.parametrize("name", BUILTIN)
def test_block_layout_and_block_mask_are_exact(name):
    @PROPERTY_SETTINGS
    @given(bound=bound_masks(name), block_q=BLOCK_SIZES, block_kv=BLOCK_SIZES)
    def run(bound, block_q, block_kv):
        dense = bound.dense()
        check_block_forms(bound, dense, block_q, block_kv)
        check_block_mask(bound, dense, block_q)

    run()


@pytest.mark.parametrize("name", BUILTIN)
def test_varlen_form_expands_to_the_dense_mask(name):
    @PROPERTY_SETTINGS
    @given(bound=bound_masks(name))
    def run(bound):
        check_varlen(bound, bound.dense())

    run()


@pytest.mark.parametrize("name", BUILTIN)
def test_label_round_trips(name):
    @PROPERTY_SETTINGS
    @given(bound=bound_masks(name))
    def run(bound):
        spec = bound.spec
        assert make_mask(spec.label) == spec
        assert make_mask(spec.label).label == spec.label
        as_yaml = {"name": spec.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.params().items()}}
        assert make_mask(as_yaml) == spec
        assert hash(make_mask(as_yaml)) == hash(spec)

    run()


# ---- varlen forms exist where the issue says they must ----------------------------------------------------
@pytest.mark.parametrize(
    "entry, seq_q, seq_kv",
    [
        ("full", 40, 60),
        ("causal", 40, 60),
        ("causal(align=top_left)", 50, 50),
        ("decode", 3, 60),
        ("sliding_window(left=7,right=3)", 40, 60),
        ("chunked_local(chunk=16)", 50, 50),
        ("document(lengths=[10,30,10])", 50, 50),
        ("document(causal=True,num_docs=5)", 50, 50),
    ],
)
def test_varlen_form_exists(entry, seq_q, seq_kv):
    bound = make_mask(entry).bind(seq_q, seq_kv)
    assert bound.varlen() is not None
    check_varlen(bound, bound.dense())


def test_varlen_form_is_none_where_flash_cannot_align():
    assert make_mask("causal(align=top_left)").bind(40, 60).varlen() is None
    assert make_mask("prefix_lm(prefix=4)").bind(40).varlen() is None
