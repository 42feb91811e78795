"""BiFormer bi-level routing attention (BRA; Zhu et al., CVPR 2023, arXiv:2303.08810; spec: methods-spec §2).

Bi-level: (1) *region routing* - the sequence is cut into regions of ``region`` tokens; region descriptors are
the means of q and k over each region, over all heads' channels (the paper routes before the head split);
the region affinity ``A = (q_bar k_bar^T) / sqrt(H * D)`` keeps the ``topk`` key regions of every query
region; (2) *token attention* - every query of a region attends, per head, to all tokens of its routed
regions (softmax over the gathered ``topk * region`` keys).

Three registrations:

- ``biformer``: the 1-D sequence form (q, k, v). Non-causal (``full``) and our causal adaptation (``causal``,
  methods-spec §2): key regions after the query region are masked out of the affinity, the own region is
  always taken (token-causal inside it) plus the ``topk - 1`` best earlier ones; query regions with fewer
  than ``topk`` earlier-or-own regions take them all (so the first ``topk`` regions are plain causal
  attention). Cross attention (``seq_q != seq_kv``, non-causal): query regions from q, key regions from k.
  Note: in the causal form a region's routing uses the mean of *all* its queries, later ones included - the
  paper's region-level routing has no token-causal form; the harness's leak probe changes keys only.
- ``biformer_2d``: the 2-D image-grid form on a flattened square grid (``seq = side^2``): regions are
  ``regions_per_side^2`` rectangles. Tokens are permuted region-major, which turns it into the 1-D form.
- ``biformer_layer``: the layer form over ``x [B, side^2, H * D]``: q, k, v projections, 2-D BRA, the local
  context enhancement ``LCE = depthwise conv 5x5 of V`` (option ``lce``, default on), output projection.
  Its routing runs on region means of ``x`` projected by ``W_q``/``W_k`` in fp32 (the mean commutes with the
  projection), so fast path and reference route identically whatever the working dtype.

Fast path (gather-dense): the routed key regions are gathered with ``index_select`` into tiles laid out
``[B, H * n_regions, topk * region, D]`` (tiles in the heads axis, no permute) and run through SDPA (cuDNN
first); the causal form runs the first ``topk`` regions as one causal SDPA call and the rest with a
bottom-right causal tile mask (own region last in the gathered keys). Lengths not divisible by the region
size are refused (``Unsupported``), never padded.

Fast path ``impl=flex`` (1-D form only): the same routing, then a ``BlockMask`` built straight from the routed
region indices (``BlockMask.from_kv_blocks``: every query block of region ``r`` lists the ``topk * region /
128`` key blocks of its routed regions, ascending, as *full* blocks - no key/value copy) and one compiled
FlexAttention call. Causal: key blocks before the query block are full, the diagonal block is the only
partial one (the mask_mod - the whole routed pattern, token-causal - decides inside it), later blocks are
left out. The region must be a multiple of FlexAttention's block (128), else ``Unsupported``.

Options (``method_options.<name>.*``): ``region`` (tokens per region, 1-D, default 256), ``topk`` (default 4;
must not exceed the number of key regions), ``impl`` (1-D: ``gather``, the default, or ``flex``),
``regions_per_side`` (2-D, default 8), ``lce`` (layer, default true), ``lce_kernel`` (default 5).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..fitting import fits_length, pow2_divisor
from ..registry import Capabilities, Unsupported, register_method
from .common import Options, flex_path, from_tiles, parameter, pattern_reference, sdpa_tiles, to_tiles

IMPLS = ("gather", "flex")  # method_options.biformer.impl
FLEX_BLOCK = 128  # FlexAttention's sparse block (the compiled kernels' granularity); CPU tests may use a smaller one


# ---- routing (shared by fast path and reference: the same fp32 decisions) -----------------------------------
def region_means(t: torch.Tensor, region: int) -> torch.Tensor:
    """``[B, H, L, D]`` -> fp32 region descriptors over all heads' channels ``[B, L / region, H * D]``."""
    b, h, length, d = t.shape
    means = t.float().reshape(b, h, length // region, region, d).mean(dim=3)
    return means.permute(0, 2, 1, 3).reshape(b, length // region, h * d)


def route_regions(q_bar: torch.Tensor, k_bar: torch.Tensor, topk: int, causal: bool):
    """Region routing from fp32 descriptors ``[B, n_q, C]``, ``[B, n_k, C]``.

    Returns ``(selected, index)``: ``selected`` bool ``[B, n_q, n_k]`` (the routed key regions of each query
    region); ``index`` long ``[B, n_q, topk]`` (non-causal: the ``topk`` best, ascending; causal: for query
    regions ``r >= topk`` the ``topk - 1`` best earlier regions, ascending, then ``r``; rows ``r < topk`` are
    unused by the fast path and hold ``0 .. topk - 1``)."""
    affinity = torch.matmul(q_bar, k_bar.transpose(-1, -2)) / math.sqrt(q_bar.shape[-1])
    batch, n_q, n_k = affinity.shape
    if not causal:
        index = affinity.topk(topk, dim=-1).indices.sort(dim=-1).values
        selected = torch.zeros_like(affinity, dtype=torch.bool).scatter_(-1, index, True)
        return selected, index
    regions = torch.arange(n_q, device=affinity.device)
    earlier = regions[None, :] < regions[:, None]  # [n_q, n_k]: r' < r
    selected = regions[None, :] <= regions[:, None]  # rows r < topk: every region up to r
    selected = selected.expand(batch, n_q, n_k).clone()
    index = regions[:topk].expand(batch, n_q, topk).clone()
    if n_q > topk:
        masked = affinity.masked_fill(~earlier, float("-inf"))[:, topk:]
        best = masked.topk(topk - 1, dim=-1).indices.sort(dim=-1).values if topk > 1 else \
            masked.new_zeros((batch, n_q - topk, 0), dtype=torch.long)
        own = regions[topk:].expand(batch, n_q - topk)[..., None]
        index[:, topk:] = torch.cat([best, own], dim=-1)
        rows = torch.zeros(batch, n_q - topk, n_k, dtype=torch.bool, device=affinity.device)
        selected[:, topk:] = rows.scatter_(-1, index[:, topk:], True)
    return selected, index


# ---- the readable reference -----------------------------------------------------------------------------------
def bra_reference(q, k, v, selected: torch.Tensor, region: int, causal: bool, rows=None,
                  region_of_q=None, region_of_k=None):
    """Masked softmax over the routed pattern: query ``i`` sees key ``j`` iff region(j) is routed for
    region(i) (and ``j <= i`` when causal). ``region_of_q/k`` map tokens to regions (default ``i // region``)."""
    seq_q, dim, seq_kv = q.shape[2], q.shape[3], k.shape[2]
    device = q.device
    region_q = torch.arange(seq_q, device=device) // region if region_of_q is None else region_of_q
    region_k = torch.arange(seq_kv, device=device) // region if region_of_k is None else region_of_k
    keys = torch.arange(seq_kv, device=device)

    def allowed(chunk):
        visible = selected[:, region_q[chunk]][:, :, region_k]  # [B, R, Lk]
        if causal:
            visible = visible & (keys[None, None, :] <= chunk[None, :, None])
        return visible[:, None]

    return pattern_reference(q, k, v, allowed, rows, 1.0 / math.sqrt(dim))


def bra_pairs(selected: torch.Tensor, region: int, heads: int, causal: bool) -> int:
    """(query, key) pairs attended, summed over batch and heads."""
    per_region = selected.sum(dim=-1).long()  # [B, n_q] routed regions per query region
    if not causal:
        return int(per_region.sum()) * region * region * heads
    full_regions = (per_region - 1).clamp_min(0)
    return int((full_regions * region * region + region * (region + 1) // 2).sum()) * heads


# ---- the fast path ----------------------------------------------------------------------------------------
def gather_regions(t: torch.Tensor, index: torch.Tensor, region: int) -> torch.Tensor:
    """Key/value regions ``index [B, n, topk]`` of ``t [B, H, L, D]`` as tiles ``[B, H * n, topk * region, D]``
    (one ``index_select`` per batch row: heads stay in front, so the tiles need no permute)."""
    b, h, length, d = t.shape
    n, topk = index.shape[1], index.shape[2]
    regions = t.reshape(b, h, length // region, region, d)
    tiles = [regions[i:i + 1].index_select(2, index[i].reshape(-1)) for i in range(b)]
    tiles = tiles[0] if b == 1 else torch.cat(tiles, dim=0)
    return tiles.reshape(b, h * n, topk * region, d)


def bra_fast(q, k, v, index: torch.Tensor, region: int, topk: int, causal: bool) -> torch.Tensor:
    heads = q.shape[1]
    if not causal:
        out = sdpa_tiles(to_tiles(q, region), gather_regions(k, index, region), gather_regions(v, index, region))
        return from_tiles(out, heads)
    n = q.shape[2] // region
    prefix = min(topk, n) * region
    head = sdpa_tiles(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], causal="square")
    if n <= topk:
        return head
    rest = index[:, topk:]
    tail = sdpa_tiles(to_tiles(q[:, :, prefix:], region), gather_regions(k, rest, region),
                      gather_regions(v, rest, region), causal="lower_right")
    return torch.cat([head, from_tiles(tail, heads)], dim=2)


def bra_block_mask(index: torch.Tensor, selected: torch.Tensor, region: int, causal: bool, seq_q: int,
                   seq_kv: int, block: int):
    """A per-batch ``BlockMask`` (broadcast over heads: routing is shared by the heads) of the routed pattern,
    from the region indices ``index [B, n_q, topk]`` (ascending, as :func:`route_regions` gives them) through
    ``BlockMask.from_kv_blocks`` - no flags to sort. Query block ``i`` (region ``i * block // region``) lists
    its routed regions' key blocks as full blocks; causal: only those before ``i`` are full (a prefix of the
    ascending list), the diagonal block ``i`` is the one partial block (the mask_mod decides inside it),
    later ones (the first ``topk`` rows' not-yet-reached regions) are left out. The mask_mod is the whole
    pattern (``selected [B, n_q, n_k]``, token-causal), so a primitive that evaluates it everywhere agrees."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, n_q, topk = index.shape
    per = region // block
    q_blocks, kv_blocks = seq_q // block, seq_kv // block
    device = index.device
    blocks = (index[..., None] * per + torch.arange(per, device=device)).reshape(batch, n_q, topk * per)
    blocks = blocks.repeat_interleave(per, dim=1).to(torch.int32)  # [B, q_blocks, topk * per], ascending
    # from_kv_blocks (torch 2.11) takes the index width as the number of key blocks: pad the lists to it
    full_indices = F.pad(blocks, (0, kv_blocks - topk * per))[:, None]
    if causal:
        diagonal = torch.arange(q_blocks, device=device, dtype=torch.int32)
        full_counts = (blocks < diagonal[None, :, None]).sum(dim=-1, dtype=torch.int32)[:, None]
        counts = torch.ones(batch, 1, q_blocks, dtype=torch.int32, device=device)
        indices = F.pad(diagonal[:, None], (0, kv_blocks - 1)).expand(batch, 1, q_blocks, kv_blocks)
    else:
        full_counts = torch.full((batch, 1, q_blocks), topk * per, dtype=torch.int32, device=device)
        counts = torch.zeros(batch, 1, q_blocks, dtype=torch.int32, device=device)
        indices = torch.zeros(batch, 1, q_blocks, kv_blocks, dtype=torch.int32, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        seen = selected[b, q_idx // region, kv_idx // region]
        return seen & (kv_idx <= q_idx) if causal else seen

    return BlockMask.from_kv_blocks(counts, indices.contiguous(), full_counts, full_indices.contiguous(),
                                    BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(seq_q, seq_kv))


def _region_fits(opts: Options, name: str, region: int, seq: int, what: str) -> int:
    if region > seq:
        opts.unfit(name, f"must be <= the {what} length {seq}, got {region} (the case is shorter than one region)")
    return region


def _topk_fits(opts: Options, topk: int, regions: int, from_length: bool = False) -> int:
    """``topk`` <= the number of key regions; ``from_length``: that number comes from the case's length (1-D),
    so a larger topk is a case outside the options (unsupported), not a bad option (2-D: both are options)."""
    if topk > regions:
        (opts.unfit if from_length else opts.fail)("topk", f"must be <= the number of key regions ({regions}), "
                                                          f"got {topk}")
    return topk


REGION, TOPK = 256, 4  # the 1-D form's defaults


@fits_length("biformer")
def fit_biformer(seq_q: int, seq_kv: int, causal: bool, given: dict) -> dict:
    """Default region and top-k that do not fit the lengths (a region longer than either or not dividing both,
    or fewer key regions than top-k): region the largest power of two dividing both lengths with at least
    2 x top-k key regions (the routing then picks at most half of them), top-k min(4, key regions / 2)."""
    region, topk = given.get("region", REGION), given.get("topk", TOPK)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (region, topk)):
        return {}  # the builder names the bad value
    if region <= min(seq_q, seq_kv) and not seq_q % region and not seq_kv % region and topk <= seq_kv // region:
        return {}
    if "region" in given and (region > min(seq_q, seq_kv) or seq_q % region or seq_kv % region):
        return {}  # a set region that does not fit: the builder names it
    fitted = {}
    if "region" not in given:
        region = pow2_divisor(math.gcd(seq_q, seq_kv), seq_kv / (2 * topk))
        fitted["region"] = region
    if "topk" not in given and topk > seq_kv // region:
        fitted["topk"] = max(1, seq_kv // region // 2)
    return fitted


@register_method(
    "biformer",
    Capabilities(family="sparse", exact=False, masks={"full", "causal"}, cross=True, backward=True),
    description="BiFormer bi-level routing attention, 1-D: region top-k routing, token attention on gathered "
                "regions (impl gather: SDPA tiles; impl flex: a BlockMask from the routed regions, FlexAttention)",
    options=("region", "topk", "impl"),
)
def build_biformer(ctx):
    case, causal = ctx.case, ctx.mask.causal
    opts = Options(ctx, "biformer")
    region = opts.int("region", REGION, minimum=1)
    topk = opts.int("topk", TOPK, minimum=1)
    impl = opts.choice("impl", "gather", IMPLS)
    _region_fits(opts, "region", region, min(case.seq_q, case.seq_kv), "sequence")
    if causal and case.seq_q != case.seq_kv:
        raise Unsupported("causal cross attention is not defined for region routing (seq_q != seq_kv)")
    for name, length in (("seq_q", case.seq_q), ("seq_kv", case.seq_kv)):
        if length % region:
            raise Unsupported(f"{name}={length} is not a multiple of method_options.biformer.region={region} "
                              "(lengths are not padded)")
    _topk_fits(opts, topk, case.seq_kv // region, from_length=True)
    block = FLEX_BLOCK
    if impl == "flex" and region % block:
        raise Unsupported(f"impl flex: method_options.biformer.region={region} is not a multiple of the "
                          f"FlexAttention block size {block}")
    attend = flex_path(ctx) if impl == "flex" else None

    def routing(q, k, v):
        return route_regions(region_means(q, region), region_means(k, region), topk, causal)

    def fn_gather(q, k, v):
        _, index = routing(q, k, v)
        return bra_fast(q, k, v, index, region, topk, causal)

    def fn_flex(q, k, v):
        selected, index = routing(q, k, v)
        block_mask = bra_block_mask(index, selected, region, causal, q.shape[2], k.shape[2], block)
        return attend(q, k, v, block_mask, False)

    fn = fn_flex if impl == "flex" else fn_gather

    def reference(q, k, v, rows=None):
        selected, _ = routing(q, k, v)
        return bra_reference(q, k, v, selected, region, causal, rows)

    def pairs(q, k, v):
        return bra_pairs(routing(q, k, v)[0], region, q.shape[1], causal)

    return Prepared(fn=fn, reference=reference, attended_pairs=pairs, phases={"routing": routing})


# ---- 2-D image grid ---------------------------------------------------------------------------------------
def grid_side(seq: int, per_side: int, name: str) -> int:
    side = math.isqrt(seq)
    if side * side != seq:
        raise Unsupported(f"the 2-D form needs a square grid: seq={seq} is not a square")
    if side % per_side:
        raise Unsupported(f"grid side {side} is not a multiple of method_options.{name}.regions_per_side={per_side}")
    return side


def region_major(side: int, per_side: int, device) -> torch.Tensor:
    """Permutation: position p of the region-major order holds grid token ``order[p]``."""
    cell = side // per_side
    grid = torch.arange(side * side, device=device).reshape(per_side, cell, per_side, cell)
    return grid.permute(0, 2, 1, 3).reshape(-1)


def grid_regions(side: int, per_side: int, device) -> torch.Tensor:
    """Region of every grid token (row-major), for the reference."""
    cell = side // per_side
    yx = torch.arange(side * side, device=device)
    return (yx // side // cell) * per_side + (yx % side) // cell


def bra_2d(per_side: int, topk: int, side: int, device):
    """(routing, fast, reference) of 2-D BRA on ``[B, H, side^2, D]`` tensors."""
    region = (side // per_side) ** 2
    order = region_major(side, per_side, device)
    inverse = torch.argsort(order)
    regions = grid_regions(side, per_side, device)

    def routing(q, k):
        return route_regions(region_means(q[:, :, order], region), region_means(k[:, :, order], region), topk, False)

    def fast(q, k, v):
        _, index = routing(q, k)
        out = bra_fast(q[:, :, order], k[:, :, order], v[:, :, order], index, region, topk, False)
        return out[:, :, inverse]

    def reference(q, k, v, rows=None):
        selected, _ = routing(q, k)
        return bra_reference(q, k, v, selected, region, False, rows, region_of_q=regions, region_of_k=regions)

    return routing, fast, reference, region


@register_method(
    "biformer_2d",
    Capabilities(family="sparse", exact=False, masks={"full"}, backward=True),
    description="BiFormer bi-level routing attention on a square image grid (seq = side^2), SDPA tiles",
    options=("regions_per_side", "topk"),
)
def build_biformer_2d(ctx):
    case = ctx.case
    opts = Options(ctx, "biformer_2d")
    per_side = opts.int("regions_per_side", 8, minimum=1)
    side = grid_side(case.seq_q, per_side, "biformer_2d")
    topk = _topk_fits(opts, opts.int("topk", 4, minimum=1), per_side * per_side)
    routing, fast, reference, region = bra_2d(per_side, topk, side, ctx.device)

    def pairs(q, k, v):
        return bra_pairs(routing(q, k)[0], region, q.shape[1], False)

    return Prepared(fn=fast, reference=reference, attended_pairs=pairs,
                    phases={"routing": lambda q, k, v: routing(q, k)})


@register_method(
    "biformer_layer",
    Capabilities(family="sparse", exact=False, masks={"full"}, backward=True, form="layer", trainable=True),
    description="BiFormer layer: q/k/v projections, 2-D bi-level routing attention, LCE (depthwise conv of V), "
                "output projection",
    options=("regions_per_side", "topk", "lce", "lce_kernel"),
)
def build_biformer_layer(ctx):
    case = ctx.case
    opts = Options(ctx, "biformer_layer")
    per_side = opts.int("regions_per_side", 8, minimum=1)
    side = grid_side(case.seq_q, per_side, "biformer_layer")
    topk = _topk_fits(opts, opts.int("topk", 4, minimum=1), per_side * per_side)
    lce = opts.bool("lce", True)
    kernel = opts.int("lce_kernel", 5, minimum=1)
    if kernel % 2 == 0:
        opts.fail("lce_kernel", f"must be odd (same-size depthwise conv), got {kernel}")
    heads, dim = case.heads_q, case.head_dim
    width = heads * dim
    w_qkv = parameter(ctx, "biformer.qkv", (width, 3 * width), width ** -0.5)
    w_out = parameter(ctx, "biformer.out", (width, width), width ** -0.5)
    conv_w = parameter(ctx, "biformer.lce.w", (width, 1, kernel, kernel), 1.0 / kernel)
    conv_b = parameter(ctx, "biformer.lce.b", (width,), 0.02)
    _, fast_attn, ref_attn, region = bra_2d(per_side, topk, side, ctx.device)
    cell = side // per_side
    params = [w_qkv, w_out] + ([conv_w, conv_b] if lce else [])

    def split(x, w):
        qkv = x @ w.to(x.dtype)  # [B, L, 3C]
        b, length, _ = qkv.shape
        q, k, v = qkv.reshape(b, length, 3, heads, dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def route_from_x(x):
        """Region means of x (fp32), projected: the routing both paths share."""
        b, length, _ = x.shape
        cells = x.float().reshape(b, per_side, cell, per_side, cell, width).mean(dim=(2, 4)).reshape(b, -1, width)
        w = w_qkv.detach().float()
        q_bar, k_bar = cells @ w[:, :width], cells @ w[:, width:2 * width]
        return route_regions(q_bar, k_bar, topk, False)

    def tail(x, out, v, w_o, cw, cb, rows=None):
        """Heads merged, LCE added, output projection; ``out`` holds the attention of the tokens ``rows``
        (all when None), and so does the result."""
        b = x.shape[0]
        out = out.transpose(1, 2).reshape(b, out.shape[2], width)
        if lce:
            image = v.transpose(1, 2).reshape(b, side, side, width).permute(0, 3, 1, 2)
            local = F.conv2d(image, cw.to(x.dtype), cb.to(x.dtype), padding=kernel // 2, groups=width)
            local = local.permute(0, 2, 3, 1).reshape(b, side * side, width)
            out = out + (local if rows is None else local[:, rows])
        return out @ w_o.to(x.dtype)

    order = region_major(side, per_side, ctx.device)
    inverse = torch.argsort(order)
    regions = grid_regions(side, per_side, ctx.device)

    def fn(x):
        _, index = route_from_x(x)
        q, k, v = split(x, w_qkv)
        out = bra_fast(q[:, :, order], k[:, :, order], v[:, :, order], index, region, topk, False)[:, :, inverse]
        return tail(x, out, v, w_out, conv_w, conv_b)

    def reference(x, rows=None):
        """The layer written out; ``rows``: only those tokens' outputs ``[B, len(rows), width]`` (the
        projections, routing and LCE are per token or local; the routed attention runs on those rows)."""
        selected, _ = route_from_x(x)
        q, k, v = split(x, w_qkv.float())
        rows = None if rows is None else rows.to(x.device)
        out = bra_reference(q, k, v, selected, region, False, rows, region_of_q=regions, region_of_k=regions)
        return tail(x, out, v, w_out.float(), conv_w.float(), conv_b.float(), rows)

    tokens = case.batch * case.seq_q
    flops = 2.0 * tokens * width * 4 * width + 4.0 * tokens * topk * region * width
    if lce:
        flops += 2.0 * tokens * width * kernel * kernel
    return Prepared(fn=fn, reference=reference, parameters=params, flops=flops,
                    phases={"routing": route_from_x},
                    attended_pairs=lambda x: case.batch * heads * case.seq_q * topk * region)
