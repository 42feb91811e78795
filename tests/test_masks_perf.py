"""Performance targets of the mask library (pytest-benchmark). With ``--benchmark-disable`` (the default in
pyproject) each runs once and still checks its target, so CI catches a regression to O(L^2) work.

Targets: visible-pair count for a 1M-token mask of 1,000 documents in under 1 s on the CPU; BlockMask /
block layout at 128K tokens in under 1 s on the H200 (``gpu`` test). On the CPU the 128K layouts get a
looser bound, the CI machine being small and shared.
"""
from __future__ import annotations

import time

import pytest
import torch

from attnbench.masks import make_mask

MILLION = 1 << 20
LONG = 128 * 1024
CPU_LAYOUT_BUDGET_S = 3.0  # the target is < 1 s; CI CPUs are small and shared


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@pytest.mark.parametrize("causal", [False, True])
def test_visible_pairs_of_1m_tokens_in_1000_documents(benchmark, causal):
    spec = make_mask({"name": "document", "num_docs": 1000, "causal": causal})

    def count():
        return spec.bind(MILLION).visible_pairs()

    pairs, seconds = timed(count)
    assert seconds < 1.0, f"visible pairs took {seconds:.3f} s"
    lengths = spec.document_lengths(MILLION)
    assert len(lengths) == 1000
    assert pairs == int((lengths * (lengths + 1) // 2 if causal else lengths * lengths).sum())
    assert benchmark(count) == pairs


@pytest.mark.parametrize(
    "entry",
    ["causal", "sliding_window(left=4096)", "document(num_docs=64,causal=True)", "sparse_strided", "bigbird"],
)
def test_block_layout_at_128k_tokens(benchmark, entry):
    bound = make_mask(entry).bind(LONG)
    layout, seconds = timed(lambda: bound.block_layout(128, 128))
    assert seconds < CPU_LAYOUT_BUDGET_S, f"block layout took {seconds:.3f} s"
    assert layout.num_q_blocks == layout.num_kv_blocks == LONG // 128
    benchmark(lambda: bound.block_layout(128, 128))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "entry",
    ["causal", "sliding_window(left=4096)", "document(num_docs=64,causal=True)", "document_prefix_lm(num_docs=64)",
     "sparse_strided", "sparse_fixed", "bigbird", "random_block_sparse"],
)
def test_block_mask_at_128k_tokens_on_the_gpu(entry):
    bound = make_mask(entry).bind(LONG)
    bound.to("cuda").block_mask("cuda")  # warm up the CUDA context and kernels
    torch.cuda.synchronize()
    start = time.perf_counter()
    block_mask = bound.block_mask("cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"BlockMask took {seconds:.3f} s"
    assert block_mask.kv_num_blocks.is_cuda
