"""``state_pass``: context parallelism for methods with a recurrent state (linear attention, gated and delta
recurrences) by a prefix scan of the state across ranks.

Each rank holds a piece of the sequence (contiguous, in rank order, for a causal mask: the state flows in
position order; any balance for the full mask). Through the method's :class:`~attnbench.methods.StateScan`
each rank (1) summarises its piece's effect on the state from a zero state (``summary``), (2) all-gathers
every rank's summary (one collective of W x the state size; its backward reduce-scatters the gradients),
(3) folds the summaries of the pieces its queries see besides its own with ``combine`` — the earlier ranks
in order (an exclusive prefix) for a causal mask, every other rank for the full mask — and (4) finishes its
outputs from that incoming state (``finish``). Gated methods carry the decay in the summary (``S ↦ M S +
b``), so the combine is the composition of affine maps, not a sum.

Gated on the method's own reference over the whole sequence (as a single-device row of the method).
Negative controls (tests): cases whose seed is the option ``cp_drop_state_seed`` drop the incoming state
(wrong outputs); with ``cp_detach_state_seed`` the incoming state is detached (right outputs, gradients of
the earlier ranks' keys and values missing).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import comm


class GatherSummaries(torch.autograd.Function):
    """``[n]`` fp32 on every rank -> ``[W, n]`` (rank order); the backward sums the gradients of the
    gathered copies over the ranks and returns this rank's row."""

    @staticmethod
    def forward(ctx, flat, group, world, me, log):
        ctx.args = (group, world, me, log)
        out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
        dist.all_gather_into_tensor(out, flat.contiguous(), group=group)
        log.add((world - 1) * comm.nbytes(flat))
        return out.view(world, flat.numel())

    @staticmethod
    def backward(ctx, grad):
        group, world, me, log = ctx.args
        grad = grad.contiguous()
        out = torch.empty(grad.shape[1], dtype=grad.dtype, device=grad.device)
        log.add((world - 1) * comm.nbytes(out))
        try:
            dist.reduce_scatter_tensor(out, grad.flatten(), group=group)
        except RuntimeError as exc:  # gloo builds without reduce_scatter: all-reduce, keep our row
            if "reduce_scatter" not in str(exc).lower() and "not supported" not in str(exc).lower():
                raise
            dist.all_reduce(grad, group=group)
            out = grad[me]
        return out, None, None, None, None


def _flatten(summary: tuple) -> tuple[torch.Tensor, list[torch.Size]]:
    return torch.cat([t.float().reshape(-1) for t in summary]), [t.shape for t in summary]


def _unflatten(flat: torch.Tensor, shapes: list[torch.Size]) -> tuple:
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return tuple(piece.view(shape) for piece, shape in zip(torch.split(flat, sizes), shapes))


def contiguous_in_rank_order(shards) -> bool:
    """True when rank r holds positions [start_r, end_r) and the pieces follow each other in rank order."""
    start = 0
    for shard in shards:
        positions = shard.positions()
        if not torch.equal(positions, torch.arange(start, start + len(positions))):
            return False
        start += len(positions)
    return True


def build_state_pass(ctx, prepared, causal: bool, drop_incoming: bool = False, detach_incoming: bool = False):
    """``fn(q, k, v, **kw)`` on this rank's piece (token extras already sharded); the scan of ``prepared``."""
    from .layouts import LayoutUnsupported

    scan = prepared.state_scan
    if scan is None:
        raise LayoutUnsupported(f"method {ctx.case.method} exposes no state scan (Prepared.state_scan): state_pass "
                                f"runs methods with a fixed-size recurrent state that declare one")
    if causal and not contiguous_in_rank_order(ctx.shards):
        raise LayoutUnsupported(f"state_pass with a causal mask needs contiguous pieces in rank order (cp_balance "
                                f"contiguous), not {ctx.spec.balance}: the state flows in position order")
    rank, world = ctx.rank, ctx.world
    group, log = dist.group.WORLD, ctx.log
    positions = ctx.shards[rank].positions(ctx.device)
    sources = list(range(rank)) if causal else [r for r in range(world) if r != rank]

    def fn(q, k, v, **kw):
        flat, shapes = _flatten(scan.summary(q, k, v, positions, **kw))
        everyone = GatherSummaries.apply(flat, group, world, rank, log)
        incoming = None
        for source in sources:
            piece = _unflatten(everyone[source], shapes)
            incoming = piece if incoming is None else scan.combine(incoming, piece)
        if drop_incoming:
            incoming = None
        elif detach_incoming and incoming is not None:
            incoming = tuple(t.detach() for t in incoming)
        out = scan.finish(q, k, v, positions, incoming, **kw)
        # every rank's backward must reach the gather's backward (a collective), also where no incoming
        # state is read (rank 0 of a causal mask): an empty slice ties the gathered tensor into the graph
        return out + everyone[:, :0].sum().to(out.dtype)

    return fn, tuple(scan.token_extras)
