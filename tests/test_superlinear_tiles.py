"""scripts/superlinear_tiles.py (the evidence that superlinear's FlexAttention tiles hold ~70x the pairs it attends
at 64K, results/cpu-superlinear-tiles): its counts equal a brute-force count from the spans' boolean patterns,
and a broken tile count (per query instead of the union per query block) is caught."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from attnbench.methods.sparse import superlinear as sl

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "superlinear_tiles.py"


def _module():
    spec = importlib.util.spec_from_file_location("superlinear_tiles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _brute(length: int, heads: int, seed: int, block: int):
    """(attended pairs, listed tiles) from the [L, L] boolean pattern of every span index."""
    gen = torch.Generator().manual_seed(seed)
    q1 = torch.randn(1, heads, length, 128, generator=gen)
    k = torch.randn(1, heads, length, 128, generator=gen)
    anchors = sl.search(q1, k, sl.stripe_distances(length, 0.5, 0), 3)
    start, end, sw = sl.span_bounds(anchors, sl.window_size(0.5, 0), 2.0, 0.0, 0.5)
    keys = torch.arange(length)
    t = torch.arange(length)
    attended, listed = 0, 0
    for j in range(3):
        pattern = ((keys[None, None, None, :] >= start[..., j, None]) & (keys <= end[..., j, None])) | \
                  ((keys[None, :] >= sw[:, None]) & (keys[None, :] <= t[:, None]))  # [1, H, L, L]
        attended += int(pattern.sum())
        blocks = pattern.reshape(1, heads, length // block, block, length // block, block).any(5).any(3)
        listed += int(blocks.sum())
    return attended, listed


def test_counts_equal_a_brute_force_count_and_a_per_query_count_is_caught():
    module = _module()
    length, heads = 1024, 1
    row = module.tiles(length, heads, seed=3)
    attended, listed = _brute(length, heads, 3, module.BLOCK)
    assert round(row["attended_per_query"] * heads * length) == attended
    assert round(row["computed_per_query"] * heads * length) == listed * module.BLOCK ** 2
    assert row["computed_over_attended"] >= 1.0  # every attended pair lies in a listed tile
    # negative control: counting a query's own tiles (no union over its block) gives another number
    per_query = 0
    gen = torch.Generator().manual_seed(3)
    q1, k = torch.randn(1, heads, length, 128, generator=gen), torch.randn(1, heads, length, 128, generator=gen)
    anchors = sl.search(q1, k, sl.stripe_distances(length, 0.5, 0), 3)
    start, end, _ = sl.span_bounds(anchors, 0, 2.0, 0.0, 0.5)
    valid = start <= end
    per_query = int(torch.where(valid, end // module.BLOCK - start // module.BLOCK + 1, 0).sum())
    assert per_query * module.BLOCK ** 2 != listed * module.BLOCK ** 2
