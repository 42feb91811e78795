"""Performance of the mask library at long lengths.

The timings are pytest-benchmark benchmarks: skipped in the normal ``pytest`` run (tests/conftest.py skips every
test that uses the ``benchmark`` fixture unless ``--benchmark-enable`` is given) and never asserted, so a slow
or busy machine cannot fail CI. Run them with
``pytest tests/test_masks_perf.py --benchmark-enable`` and read the table against the targets: visible-pair
count for a 1M-token mask of 1,000 documents under 1 s on the CPU; block layout at 128K tokens under 1 s;
BlockMask at 128K tokens under 1 s on the H200 (``gpu``). What the calls return is checked by the ordinary
tests beside them, at the same sizes.
"""
from __future__ import annotations

import pytest
import torch

from attnbench.masks import make_mask

MILLION = 1 << 20
LONG = 128 * 1024
LAYOUT_ENTRIES = ["causal", "sliding_window(left=4096)", "document(num_docs=64,causal=True)", "sparse_strided",
                  "bigbird"]
GPU_ENTRIES = ["causal", "sliding_window(left=4096)", "document(num_docs=64,causal=True)",
               "document_prefix_lm(num_docs=64)", "sparse_strided", "sparse_fixed", "bigbird", "random_block_sparse"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def document_pairs(causal: bool) -> tuple[object, int]:
    """The 1,000-document mask over 1M tokens and its pair count from the document lengths."""
    spec = make_mask({"name": "document", "num_docs": 1000, "causal": causal})
    lengths = spec.document_lengths(MILLION)
    assert len(lengths) == 1000
    return spec, int((lengths * (lengths + 1) // 2 if causal else lengths * lengths).sum())


@pytest.mark.parametrize("causal", [False, True])
def test_visible_pairs_of_1m_tokens_in_1000_documents(causal):
    spec, expected = document_pairs(causal)
    assert spec.bind(MILLION).visible_pairs() == expected


@pytest.mark.benchmark(group="masks: visible pairs, 1M tokens")
@pytest.mark.parametrize("causal", [False, True])
def test_benchmark_visible_pairs_of_1m_tokens(benchmark, causal):
    spec, expected = document_pairs(causal)
    assert benchmark(lambda: spec.bind(MILLION).visible_pairs()) == expected


@pytest.mark.parametrize("entry", LAYOUT_ENTRIES)
def test_block_layout_at_128k_tokens(entry):
    layout = make_mask(entry).bind(LONG).block_layout(128, 128)
    assert layout.num_q_blocks == layout.num_kv_blocks == LONG // 128


@pytest.mark.benchmark(group="masks: block layout, 128K tokens")
@pytest.mark.parametrize("entry", LAYOUT_ENTRIES)
def test_benchmark_block_layout_at_128k_tokens(benchmark, entry):
    bound = make_mask(entry).bind(LONG)
    layout = benchmark(lambda: bound.block_layout(128, 128))
    assert layout.num_q_blocks == LONG // 128


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("entry", GPU_ENTRIES)
def test_block_mask_at_128k_tokens_on_the_gpu(entry):
    block_mask = make_mask(entry).bind(LONG).block_mask("cuda")
    assert block_mask.kv_num_blocks.is_cuda


@pytest.mark.gpu
@needs_cuda
@pytest.mark.benchmark(group="masks: BlockMask on the GPU, 128K tokens")
@pytest.mark.parametrize("entry", GPU_ENTRIES)
def test_benchmark_block_mask_at_128k_tokens_on_the_gpu(benchmark, entry):
    bound = make_mask(entry).bind(LONG)
    bound.to("cuda").block_mask("cuda")  # warm up the CUDA context and kernels

    def build():
        block_mask = bound.block_mask("cuda")
        torch.cuda.synchronize()
        return block_mask

    assert benchmark(build).kv_num_blocks.is_cuda
