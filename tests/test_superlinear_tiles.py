"""scripts/superlinear_tiles.py (the evidence that superlinear's FlexAttention tiles hold ~70x the pairs it attends
at 64K, results/cpu-superlinear-tiles): its counts equal a brute-force count from the spans' boolean patterns,
in position order and in each span's sorted order, and a broken tile count is caught."""
from __future__ import annotations

import torch

from attnbench.methods.sparse import superlinear as sl
from scriptload import load_script


def _module():
    return load_script("superlinear_tiles")


def _brute(length: int, heads: int, seed: int, block: int):
    """(attended pairs, listed tiles in position order, listed tiles with each span's rows sorted by its start) from
    the [L, L] boolean pattern of every span index."""
    gen = torch.Generator().manual_seed(seed)
    q1 = torch.randn(1, heads, length, 128, generator=gen)
    k = torch.randn(1, heads, length, 128, generator=gen)
    anchors = sl.search(q1, k, sl.stripe_distances(length, 0.5, 0), 3)
    start, end, sw = sl.span_bounds(anchors, sl.window_size(0.5, 0), 2.0, 0.0, 0.5)
    keys = torch.arange(length)
    t = torch.arange(length)
    attended, listed, listed_sorted = 0, 0, 0
    for j in range(3):
        pattern = ((keys[None, None, None, :] >= start[..., j, None]) & (keys <= end[..., j, None])) | \
                  ((keys[None, :] >= sw[:, None]) & (keys[None, :] <= t[:, None]))  # [1, H, L, L]
        attended += int(pattern.sum())
        blocks = pattern.reshape(1, heads, length // block, block, length // block, block).any(5).any(3)
        listed += int(blocks.sum())
        order = torch.argsort(start[..., j], dim=-1, stable=True)  # the rows as query_order sorted runs them
        rows = pattern.gather(2, order[..., None].expand(-1, -1, -1, length))
        listed_sorted += int(rows.reshape(1, heads, length // block, block, length // block, block).any(5).any(3).sum())
    return attended, listed, listed_sorted


def _agrees(module, length=1024, heads=1, seed=3) -> bool:
    row = module.tiles(length, heads, seed=seed)
    attended, listed, listed_sorted = _brute(length, heads, seed, module.BLOCK)
    return (round(row["attended_per_query"] * heads * length) == attended
            and round(row["computed_per_query"] * heads * length) == listed * module.BLOCK ** 2
            and round(row["sorted_computed_over_attended"] * attended) == listed_sorted * module.BLOCK ** 2)


def test_counts_equal_a_brute_force_count_and_a_broken_count_is_caught(monkeypatch):
    module = _module()
    assert _agrees(module)
    row = module.tiles(1024, 1, seed=3)
    assert row["computed_over_attended"] >= row["sorted_computed_over_attended"] >= 1.0  # attended pairs are listed
    # negative control: block flags that stop one block early (each range's last block dropped) are caught; the
    # script counts the fast path's own flags (superlinear.span_block_flags), so the break goes there
    real = module.sl.ranges_to_blocks
    monkeypatch.setattr(module.sl, "ranges_to_blocks", lambda s, e, n, b, qb: real(s, e - b, n, b, qb))
    assert not _agrees(module)
