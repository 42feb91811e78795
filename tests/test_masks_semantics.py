"""What each mask means, on hand-checked small examples; parameter validation; document length drawing;
FlexAttention running every mask."""
from __future__ import annotations

import warnings

import pytest
import torch

from attnbench import masks
from attnbench.masks import MaskParamError, MaskTooLarge, make_mask


def grid(text: str) -> torch.Tensor:
    """A bool mask from rows of '1' / '.' characters."""
    return torch.tensor([[c == "1" for c in row] for row in text.split()], dtype=torch.bool)


@pytest.mark.parametrize(
    "entry, seq_q, seq_kv, expected",
    [
        ("causal", 2, 4, "111. 1111"),
        ("causal(align=top_left)", 2, 4, "1... 11.."),
        ("decode", 2, 5, "1111. 11111"),
        ("full", 2, 3, "111 111"),
        ("prefix_lm(prefix=2)", 4, 4, "11.. 11.. 111. 1111"),
        ("block_causal(block=2)", 4, 4, "11.. 11.. 1111 1111"),
        ("sliding_window(left=1,right=1)", 4, 4, "11.. 111. .111 ..11"),
        ("sliding_window(left=1,right=0)", 4, 4, "1... 11.. .11. ..11"),
        ("dilated_sliding_window(left=2,right=1,dilation=2)", 6, 6,
         "1.1... .1.1.. 1.1.1. .1.1.1 1.1.1. .1.1.1"),
        ("chunked_local(chunk=2)", 4, 4, "1... 11.. ..1. ..11"),
        ("longformer(left=0,right=0,global_tokens=1)", 4, 4, "1111 11.. 1.1. 1..1"),
        ("document(lengths=[2,3])", 5, 5, "11... 11... ..111 ..111 ..111"),
        ("document(lengths=[2,3],causal=True)", 5, 5, "1.... 11... ..1.. ..11. ..111"),
        ("document_prefix_lm(lengths=[3,3],prefix_lengths=[2,0])", 6, 6,
         "11.... 11.... 111... ...1.. ...11. ...111"),
        ("block_causal_document(lengths=[3,2],frame=2)", 5, 5, "11... 11... 111.. ...11 ...11"),
        ("shared_question(question=2,answer_lengths=[2,2])", 6, 6,
         "1..... 11.... 111... 1111.. 11..1. 11..11"),
        ("sparse_strided(stride=3)", 8, 8,
         "1....... 11...... 111..... 1111.... .1111... ..1111.. 1..1111. .1..1111"),
        ("sparse_fixed(stride=3,summary=1)", 7, 7,
         "1...... 11..... 111.... ..11... ..111.. ..1111. ..1..11"),
    ],
)
def test_mask_means_what_it_says(entry, seq_q, seq_kv, expected):
    assert torch.equal(make_mask(entry).bind(seq_q, seq_kv).dense(), grid(expected))


def test_bigbird_has_global_window_and_random_blocks():
    dense = make_mask("bigbird(block=1,global_blocks=1,window_blocks=0,random_blocks=2,seed=3)").bind(10).dense()
    assert dense[0].all() and dense[:, 0].all()  # the global block
    assert dense.diagonal().all()  # window of 0 blocks each side: the diagonal
    assert torch.equal(dense[1:].sum(dim=1), torch.full((9,), 4))  # global + diagonal + 2 random
    other = make_mask("bigbird(block=1,global_blocks=1,window_blocks=0,random_blocks=2,seed=4)").bind(10).dense()
    assert not torch.equal(dense, other)


def test_random_block_sparse_meets_its_density_per_row():
    bound = make_mask("random_block_sparse(block=4,density=0.25)").bind(32, 64)  # 8 x 16 blocks
    assert torch.equal(bound.block_counts(4, 4).gt(0).sum(dim=1), torch.full((8,), 4))
    assert bound.density() == pytest.approx(0.25)


# ---- validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "entry, lengths, field",
    [
        ("sliding_window(left=-1)", None, "left"),
        ("sliding_window(right=-3)", None, "right"),
        ("sliding_window(left=1.5)", None, "left"),
        ("dilated_sliding_window(dilation=0)", None, "dilation"),
        ("longformer(left=-2)", None, "left"),
        ("causal(align=middle)", None, "align"),
        ("chunked_local(chunk=0)", None, "chunk"),
        ("block_causal(block=0)", None, "block"),
        ("prefix_lm(prefix=-1)", None, "prefix"),
        ("prefix_lm(prefix=500)", (100, 100), "prefix"),
        ("document(lengths=[10,20])", (40, 40), "lengths"),
        ("document(lengths=[0,5])", None, "lengths"),
        ("document(causal=1)", None, "causal"),
        ("document(distribution=zipf)", None, "distribution"),
        ("document(sigma=0)", None, "sigma"),
        ("document(num_docs=2,lengths=[5,5])", None, "num_docs"),
        ("document(num_docs=2,max_share=0.25)", (100, 100), "max_share"),
        ("document(max_share=0)", None, "max_share"),
        ("document(num_docs=200)", (100, 100), "num_docs"),
        ("document(causal=True)", (64, 32), "seq_kv"),
        ("document_prefix_lm(prefix_fraction=1.5)", None, "prefix_fraction"),
        ("document_prefix_lm(lengths=[5,5],prefix_lengths=[6,1])", None, "prefix_lengths"),
        ("document_prefix_lm(lengths=[5,5],prefix_lengths=[1])", None, "prefix_lengths"),
        ("block_causal_document(frame=0)", None, "frame"),
        ("shared_question(question=100)", (100, 100), "question"),
        ("shared_question(question=10,answer_lengths=[5,5])", (30, 30), "answer_lengths"),
        ("shared_question(question=0)", None, "question"),
        ("random_block_sparse(density=0)", None, "density"),
        ("random_block_sparse(density=1.5)", None, "density"),
        ("random_block_sparse(density=-0.1)", None, "density"),
        ("bigbird(block=0)", None, "block"),
        ("bigbird(random_blocks=-1)", None, "random_blocks"),
        ("sparse_strided(stride=0)", None, "stride"),
        ("sparse_fixed(stride=4,summary=5)", None, "summary"),
        ("longformer(global_tokens=50)", (20, 20), "global_tokens"),
        ("longformer", (20, 30), "seq_kv"),
        ("decode", (10, 5), "seq_q"),
        ("causal", (0, 5), "seq_q"),
        ("full(window=3)", None, "window"),
        ("nosuchmask", None, "name"),
    ],
)
def test_bad_parameters_are_rejected_naming_the_field(entry, lengths, field):
    with pytest.raises(MaskParamError) as caught:
        spec = make_mask(entry)
        assert lengths is not None, f"{entry} was accepted"
        spec.bind(*lengths)
    assert caught.value.field == field
    assert f"field {field!r}" in str(caught.value)


def test_unknown_name_lists_the_registered_masks():
    with pytest.raises(MaskParamError, match="registered: .*sliding_window"):
        make_mask({"name": "slidingwindow"})


def test_dense_refuses_politely_above_its_budget():
    bound = make_mask("full").bind(1 << 20)
    with pytest.raises(MaskTooLarge, match=r"1048576\.0 MiB") as caught:
        bound.dense(max_bytes=1 << 20)
    assert caught.value.needed_bytes == 1 << 40


def test_lists_from_yaml_become_tuples():
    spec = make_mask({"name": "document", "lengths": [3, 4]})
    assert spec.lengths == (3, 4) and hash(spec) == hash(make_mask("document(lengths=[3,4])"))
    assert make_mask({"name": "document", "sigma": 2}).label == make_mask("document(sigma=2.0)").label


# ---- document lengths ----------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["equal", "uniform", "lognormal", "pareto"])
def test_drawn_document_lengths_fill_the_sequence_within_the_cap(distribution):
    spec = make_mask({"name": "document", "num_docs": 50, "distribution": distribution, "max_share": 0.1})
    lengths = spec.document_lengths(10_000)
    assert len(lengths) == 50 and int(lengths.sum()) == 10_000
    assert int(lengths.min()) >= 1 and int(lengths.max()) <= 1_000
    assert torch.equal(spec.document_lengths(10_000), lengths)  # deterministic
    if distribution != "equal":
        reseeded = make_mask({"name": "document", "num_docs": 50, "distribution": distribution, "seed": 1,
                              "max_share": 0.1})
        assert not torch.equal(reseeded.document_lengths(10_000), lengths)


def test_heavy_tails_hit_the_cap_and_equal_lengths_do_not():
    pareto = make_mask("document(num_docs=20,distribution=pareto,alpha=0.5,max_share=0.1)").document_lengths(1000)
    assert int(pareto.max()) == 100  # water-filling capped the longest documents
    equal = make_mask("document(num_docs=8,distribution=equal)").document_lengths(1000)
    assert int(equal.max()) - int(equal.min()) <= 1


def test_mean_length_sets_the_document_count():
    assert len(make_mask("document(mean_length=100)").document_lengths(1050)) == 11
    # never a single document: at least enough documents of at most max_share of the sequence
    assert len(make_mask("document(mean_length=5000,max_share=0.5)").document_lengths(1000)) == 2


# ---- FlexAttention ------------------------------------------------------------------------------------
TINY = {
    "full": ("full", 24, 40),
    "causal": ("causal(align=top_left)", 24, 40),
    "decode": ("decode", 3, 40),
    "prefix_lm": ("prefix_lm(prefix=10)", 40, 40),
    "block_causal": ("block_causal(block=7)", 40, 40),
    "sliding_window": ("sliding_window(left=5,right=2)", 24, 40),
    "dilated_sliding_window": ("dilated_sliding_window(left=4,right=1,dilation=3)", 40, 40),
    "chunked_local": ("chunked_local(chunk=9)", 40, 40),
    "longformer": ("longformer(left=3,right=3,global_tokens=2)", 40, 40),
    "document": ("document(num_docs=4,causal=True)", 45, 45),
    "document_prefix_lm": ("document_prefix_lm(num_docs=3)", 45, 45),
    "block_causal_document": ("block_causal_document(num_docs=3,frame=4)", 45, 45),
    "shared_question": ("shared_question(question=10,num_answers=3)", 45, 45),
    "bigbird": ("bigbird(block=5)", 45, 45),
    "random_block_sparse": ("random_block_sparse(block=6,density=0.3)", 24, 40),
    "sparse_strided": ("sparse_strided(stride=5)", 40, 40),
    "sparse_fixed": ("sparse_fixed(stride=8,summary=2)", 40, 40),
}


def test_every_mask_has_a_flex_case():
    assert sorted(TINY) == masks.list_masks()


@pytest.mark.parametrize("name", sorted(TINY))
def test_flex_attention_with_the_block_mask_matches_masked_softmax(name):
    from torch.nn.attention.flex_attention import flex_attention

    entry, seq_q, seq_kv = TINY[name]
    bound = make_mask(entry).bind(seq_q, seq_kv)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=generator, dtype=torch.float64) for n in (seq_q, seq_kv, seq_kv))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        out = flex_attention(q, k, v, block_mask=bound.block_mask(block_size=16))
    dense = bound.dense()
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~dense, float("-inf"))
    reference = torch.softmax(scores, dim=-1) @ v
    rows = dense.any(dim=1)
    assert rows.any()
    torch.testing.assert_close(out[:, :, rows], reference[:, :, rows])
