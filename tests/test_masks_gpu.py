"""On the GPU: compiled FlexAttention (forward and backward) with every mask's BlockMask, at lengths that are
not multiples of the block size, against an fp32 masked-softmax reference. This checks that each mask_mod
compiles and that the block layout (full tiles skip mask_mod; ragged last tiles count as full when every real
pair is visible) gives exact attention."""
from __future__ import annotations

import pytest
import torch

from attnbench import masks
from attnbench.masks import make_mask

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {
    "full": ("full", 1000, 777),
    "causal": ("causal", 777, 1000),
    "decode": ("decode", 5, 1000),
    "prefix_lm": ("prefix_lm(prefix=300)", 1000, 1000),
    "block_causal": ("block_causal(block=200)", 1000, 1000),
    "sliding_window": ("sliding_window(left=200,right=50)", 777, 1000),
    "dilated_sliding_window": ("dilated_sliding_window(left=100,right=20,dilation=3)", 1000, 1000),
    "chunked_local": ("chunked_local(chunk=300)", 1000, 1000),
    "longformer": ("longformer(left=100,right=100,global_tokens=20)", 1000, 1000),
    "document": ("document(num_docs=7,causal=True)", 1000, 1000),
    "document_prefix_lm": ("document_prefix_lm(num_docs=5)", 1000, 1000),
    "block_causal_document": ("block_causal_document(num_docs=4,frame=100)", 1000, 1000),
    "shared_question": ("shared_question(question=300,num_answers=4)", 1000, 1000),
    "bigbird": ("bigbird(block=64)", 1000, 1000),
    "random_block_sparse": ("random_block_sparse(block=128,density=0.3)", 777, 1000),
    "sparse_strided": ("sparse_strided(stride=100)", 1000, 1000),
    "sparse_fixed": ("sparse_fixed(stride=128,summary=16)", 1000, 1000),
}


def test_every_mask_has_a_gpu_case():
    assert sorted(CASES) == masks.list_masks()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_flex_attention_is_exact_with_the_block_mask(name):
    from torch.nn.attention.flex_attention import flex_attention

    entry, seq_q, seq_kv = CASES[name]
    bound = make_mask(entry).bind(seq_q, seq_kv)
    block_mask = bound.block_mask("cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda", generator=generator, requires_grad=True)
               for n in (seq_q, seq_kv, seq_kv))
    compiled = torch.compile(flex_attention, dynamic=False)
    out = compiled(q, k, v, block_mask=block_mask)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    dense = bound.dense("cuda")
    rows = dense.any(dim=1)
    scores = (q @ k.transpose(-1, -2) / 8.0).masked_fill(~dense, float("-inf"))
    reference = torch.softmax(scores, dim=-1).nan_to_num() @ v
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad_out * rows[:, None])
    torch.testing.assert_close(out[:, :, rows], reference[:, :, rows], atol=2e-3, rtol=2e-3)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, atol=5e-3, rtol=5e-3)
