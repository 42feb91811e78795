"""Collectives for the layouts, with autograd where a layout differentiates through them, and a count of
the bytes each rank sends as the algorithm prescribes (``CommLog``): point-to-point sends count their
payload; an all-to-all counts what goes to the other ranks; an all-gather and a reduce-scatter count what a
ring algorithm sends, (n - 1) x the (padded) shard. The counts are the ``comm_bytes`` column.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class CommLog:
    """Bytes this rank sent, by direction of the pass (``fwd`` / ``bwd``)."""

    def __init__(self):
        self.sent = {"fwd": 0, "bwd": 0}
        self.phase = "fwd"

    def add(self, nbytes: int) -> None:
        self.sent[self.phase] += int(nbytes)

    def reset(self) -> None:
        self.sent = {"fwd": 0, "bwd": 0}

    @property
    def total(self) -> int:
        return self.sent["fwd"] + self.sent["bwd"]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group, log: CommLog):
    """Post point-to-point sends and receives (global peer ranks) together; returns the requests."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer, group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for t, peer in recvs]
    for t, _ in sends:
        log.add(nbytes(t))
    return dist.batch_isend_irecv(ops) if ops else []


def wait(requests) -> None:
    for request in requests:
        request.wait()


def _all_to_all(chunks_out: list[int], flat_in: torch.Tensor, chunks_in: list[int], group, log, me: int):
    out = torch.empty(sum(chunks_out), dtype=flat_in.dtype, device=flat_in.device)
    dist.all_to_all_single(out, flat_in, chunks_out, chunks_in, group=group)
    log.add(sum(n for i, n in enumerate(chunks_in) if i != me) * flat_in.element_size())
    return out


def heads_to_seq(x: torch.Tensor, group, lengths: list[int], me: int, log: CommLog) -> torch.Tensor:
    """Ulysses scatter: ``[B, H, L_me, D]`` sequence shards -> ``[B, H/n, sum(lengths), D]`` (head group
    ``me``, every member's shard in member order)."""
    n = len(lengths)
    b, h, l_me, d = x.shape
    part = h // n
    flat = x.reshape(b, n, part, l_me, d).transpose(0, 1).contiguous().flatten()
    out = _all_to_all([b * part * length * d for length in lengths], flat, [b * part * l_me * d] * n, group, log, me)
    pieces = torch.split(out, [b * part * length * d for length in lengths])
    return torch.cat([p.view(b, part, length, d) for p, length in zip(pieces, lengths)], dim=2)


def seq_to_heads(y: torch.Tensor, group, lengths: list[int], me: int, log: CommLog) -> torch.Tensor:
    """The inverse of ``heads_to_seq``: ``[B, H/n, sum(lengths), D]`` -> ``[B, H, L_me, D]``."""
    n = len(lengths)
    b, part, _, d = y.shape
    l_me = lengths[me]
    flat = torch.cat([p.contiguous().flatten() for p in torch.split(y, lengths, dim=2)])
    out = _all_to_all([b * part * l_me * d] * n, flat, [b * part * length * d for length in lengths], group, log, me)
    return out.view(n, b, part, l_me, d).transpose(0, 1).reshape(b, n * part, l_me, d)


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, lengths, me, log):
        ctx.args = (group, lengths, me, log)
        return heads_to_seq(x, group, lengths, me, log)

    @staticmethod
    def backward(ctx, grad):
        group, lengths, me, log = ctx.args
        return seq_to_heads(grad.contiguous(), group, lengths, me, log), None, None, None, None


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, lengths, me, log):
        ctx.args = (group, lengths, me, log)
        return seq_to_heads(y, group, lengths, me, log)

    @staticmethod
    def backward(ctx, grad):
        group, lengths, me, log = ctx.args
        return heads_to_seq(grad.contiguous(), group, lengths, me, log), None, None, None, None


def all_gather_seq(x: torch.Tensor, group, lengths: list[int], log: CommLog) -> torch.Tensor:
    """``[B, H, L_me, D]`` shards of every member -> ``[B, H, sum(lengths), D]`` in member order (padded to
    the longest shard on the wire)."""
    n, longest = len(lengths), max(lengths)
    b, h, l_me, d = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 0, longest - l_me)).contiguous()
    out = torch.empty(n * b * h * longest * d, dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, padded.flatten(), group=group)
    log.add((n - 1) * nbytes(padded))
    out = out.view(n, b, h, longest, d)
    return torch.cat([out[i, :, :, :length] for i, length in enumerate(lengths)], dim=2)


def reduce_scatter_seq(grad: torch.Tensor, group, lengths: list[int], me: int, log: CommLog) -> torch.Tensor:
    """The adjoint of ``all_gather_seq``: sum every member's ``[B, H, sum(lengths), D]`` and keep this
    member's slice ``[B, H, L_me, D]``."""
    n, longest = len(lengths), max(lengths)
    pieces = torch.split(grad, lengths, dim=2)
    stacked = torch.stack([torch.nn.functional.pad(p, (0, 0, 0, longest - p.shape[2])) for p in pieces]).contiguous()
    shape = stacked.shape[1:]
    out = torch.empty(stacked[0].numel(), dtype=grad.dtype, device=grad.device)
    log.add((n - 1) * nbytes(out))
    try:
        dist.reduce_scatter_tensor(out, stacked.flatten(), group=group)
        out = out.view(shape)
    except RuntimeError as exc:  # gloo builds without reduce_scatter: all-reduce, keep our slice
        if "reduce_scatter" not in str(exc).lower() and "not supported" not in str(exc).lower():
            raise
        dist.all_reduce(stacked, group=group)
        out = stacked[me]
    return out[:, :, : lengths[me]]
