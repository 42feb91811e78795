"""CP layouts over ``torch.distributed``: each builds, on every rank, ``fn(q, k, v) -> out`` on the rank's
local shards ``[B, H, L_rank, D]`` (positions from ``shard``), differentiable in q, k and v.

* ``ring`` — KV chunks rotate around the ring by point-to-point sends posted before each step's compute
  (overlapped); partial results merge by log-sum-exp; the backward rotates K/V again and sends the dK/dV
  accumulators along with them, so each returns to its owner (a custom ``autograd.Function``);
* ``ring_allgather`` — K and V all-gathered, local attention of the query shard against all of them; the
  backward reduce-scatters dK/dV to their owners;
* ``ulysses`` — all-to-all from sequence shards to head shards, any registered method on the whole
  sequence for H/W heads (with the case's mask, positions restored to their order), all-to-all back;
* ``usp`` — Ulysses x ring on a 2-D grid (``ulysses`` ranks per all-to-all group, ``W / ulysses`` in each
  ring): all-to-all inside the group, then ring attention across groups;
* ``torch_cp`` — PyTorch's ``context_parallel`` (SDPA flash / efficient / cuDNN, full or causal), entered
  through ``guard.guarded_context_parallel`` so a failure never leaves SDPA patched;
* ``state_pass`` — methods with a recurrent state (linear attention, gated recurrences): a prefix scan of the
  state across ranks (``statepass``);
* ``yunchang_*`` / ``ring_flash_attn`` — adapters, registered as unavailable where the package does not import.

The label of a layout is ``name`` or ``name(balance=zigzag,ulysses=2)`` (defaults omitted), the value of
the row's ``layout`` column.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import comm
from .adapters import ADAPTERS
from .kernels import ChunkKernel, KernelUnsupported, expand_heads, make_kernel, merge_weight
from .shard import BALANCES, Shard, concat, make_shards
from .tiles import Tile, TileUnsupported, plan_tile

STRATEGIES = ("ring", "ring_allgather", "ulysses", "usp", "torch_cp", "state_pass")
LAYOUT_NAMES = ("single", *STRATEGIES, *ADAPTERS)


class LayoutUnsupported(Exception):
    """This layout cannot run the case; the message is the row's reason."""


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    balance: str = "contiguous"
    ulysses: int = 0  # usp: ranks per all-to-all group; 0 = automatic

    @property
    def label(self) -> str:
        parts = []
        if self.balance != "contiguous":
            parts.append(f"balance={self.balance}")
        if self.ulysses:
            parts.append(f"ulysses={self.ulysses}")
        return self.name + (f"({','.join(parts)})" if parts else "")


LABEL = re.compile(r"^([a-z_]+)(?:\((.*)\))?$")


def parse_layout(label: str) -> LayoutSpec:
    """``ring``, ``ring(balance=zigzag)``, ``usp(balance=zigzag,ulysses=2)`` -> LayoutSpec (ValueError else)."""
    match = LABEL.match(str(label).strip())
    if not match or match.group(1) not in LAYOUT_NAMES:
        raise ValueError(f"layout {label!r} is not one of: {', '.join(LAYOUT_NAMES)} (optionally with "
                         f"(balance=...,ulysses=N))")
    fields = {}
    for item in filter(None, (match.group(2) or "").split(",")):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key == "balance":
            if value not in BALANCES:
                raise ValueError(f"layout {label!r}: balance {value!r} is not one of: {', '.join(BALANCES)}")
            fields["balance"] = value
        elif key == "ulysses":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"layout {label!r}: ulysses must be a positive integer, got {value!r}")
            fields["ulysses"] = int(value)
        else:
            raise ValueError(f"layout {label!r}: unknown parameter {key!r} (balance, ulysses)")
    return LayoutSpec(match.group(1), **fields)


def adapter_availability(name: str) -> tuple[bool, str]:
    """(available, reason or what it runs): see ``adapters``."""
    from .adapters import availability

    return availability(name)


def usp_degree(spec: LayoutSpec, world: int, heads_q: int) -> int:
    """Ranks per Ulysses group of ``usp``: the given degree, else the largest proper divisor of the world
    size that divides heads_q (1 = a pure ring when none does)."""
    if spec.ulysses:
        return spec.ulysses
    for degree in range(world - 1, 0, -1):
        if world % degree == 0 and heads_q % degree == 0:
            return degree
    return 1


# ---- process groups -----------------------------------------------------------------------------------
_GROUPS: dict[tuple[int, ...], object] = {}


def subgroup(ranks: list[int]):
    """The process group of ``ranks`` (WORLD for all ranks). Every rank must ask for every group in the
    same order (``new_group`` is collective); the layouts do."""
    ranks = tuple(ranks)
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    if ranks not in _GROUPS:
        _GROUPS[ranks] = dist.new_group(list(ranks))
    return _GROUPS[ranks]


# ---- the context of a CP case on one rank ---------------------------------------------------------------
@dataclass
class CPContext:
    case: object  # config.plan.Case
    spec: LayoutSpec
    bound: object  # masks.BoundMask (CPU)
    device: torch.device
    rank: int
    world: int
    shards: list[Shard]
    options: dict = field(default_factory=dict)
    log: comm.CommLog = field(default_factory=comm.CommLog)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.case.head_dim)


@dataclass
class BuiltLayout:
    fn: object  # (q, k, v) -> out on local shards
    context: object = contextlib.nullcontext  # entered around every call of a case (torch_cp)
    visible_pairs: int | None = None  # pairs this rank computes (its share of the work)
    notes: str = ""
    # an approximate / recurrent method: its Prepared for the whole case (the rank runner makes its extras
    # and gates against its own reference); ``fn`` then takes the extras as keyword arguments, those named
    # in ``token_extras`` sharded along dim 2 like the sequence
    prepared: object = None
    token_extras: tuple = ()


# ---- merging partial results ---------------------------------------------------------------------------
def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, q0: int, q1: int, out, lse) -> None:
    """Fold a partial (out, lse) for rows [q0, q1) into the running float32 accumulators."""
    old_lse = acc_lse[:, :, q0:q1]
    new_lse = torch.logaddexp(old_lse, lse)
    w_old = merge_weight(old_lse, new_lse)[..., None]
    w_new = merge_weight(lse, new_lse)[..., None]
    acc_out[:, :, q0:q1] = acc_out[:, :, q0:q1] * w_old + out.float() * w_new
    acc_lse[:, :, q0:q1] = new_lse


def attend(kernel: ChunkKernel, tile: Tile, q, k, v, scale, acc_out, acc_lse, rests: dict, key) -> None:
    for index, call in enumerate(tile.calls):
        out, lse, rest = kernel.forward(q[:, :, call.q0:call.q1], k[:, :, call.k0:call.k1],
                                        v[:, :, call.k0:call.k1], call, scale)
        rests[(key, index)] = rest
        merge_into(acc_out, acc_lse, call.q0, call.q1, out, lse)


def attend_backward(kernel, tile, q, k, v, out, lse, dout, scale, rests, key, dq, dk, dv) -> None:
    for index, call in enumerate(tile.calls):
        rows = slice(call.q0, call.q1)
        keys = slice(call.k0, call.k1)
        gq, gk, gv = kernel.backward(q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
                                     lse[:, :, rows], dout[:, :, rows], call, scale, rests.get((key, index)))
        dq[:, :, rows] += gq.float()
        dk[:, :, keys] += gk.float()
        dv[:, :, keys] += gv.float()


def _accumulators(q):
    b, h, length, _ = q.shape
    out = torch.zeros(b, h, length, q.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, length), float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


# ---- ring ----------------------------------------------------------------------------------------------
@dataclass
class RingPlan:
    members: list[int]  # global ranks in ring order
    me: int  # my index in ``members``
    shards: list[Shard]  # per member
    tiles: dict[int, Tile]  # my queries against member i's keys
    kernel: ChunkKernel
    group: object
    log: comm.CommLog
    scale: float
    drop_chunk: int | None = None  # negative control: skip the keys of this ring step (tests only)


def ring_plan(bound, members, me, shards, kernel, group, log, scale) -> RingPlan:
    tiles = {}
    for src in range(len(members)):
        try:
            tiles[src] = plan_tile(bound, shards[me], shards[src], kernel.any_mask)
        except TileUnsupported as exc:
            raise LayoutUnsupported(f"{kernel.name} kernel: {exc}") from None
        for call in tiles[src].calls:
            kernel.prepare(call, bound)
    return RingPlan(members, me, shards, tiles, kernel, group, log, scale)


def _kv_like(k, length):
    b, h, _, d = k.shape
    return torch.empty(b, h, length, d, dtype=k.dtype, device=k.device)


def ring_forward(plan: RingPlan, q, k, v):
    n, me = len(plan.members), plan.me
    nxt, prv = plan.members[(me + 1) % n], plan.members[(me - 1) % n]
    acc_out, acc_lse = _accumulators(q)
    rests: dict = {}
    cur_k, cur_v = k.contiguous(), v.contiguous()
    for step in range(n):
        src = (me - step) % n
        requests = []
        if step < n - 1:
            length = plan.shards[(me - step - 1) % n].length
            next_k, next_v = _kv_like(k, length), _kv_like(v, length)
            requests = comm.exchange([(cur_k, nxt), (cur_v, nxt)], [(next_k, prv), (next_v, prv)], plan.group,
                                     plan.log)
        if step != plan.drop_chunk:
            attend(plan.kernel, plan.tiles[src], q, cur_k, cur_v, plan.scale, acc_out, acc_lse, rests, src)
        comm.wait(requests)
        if step < n - 1:
            cur_k, cur_v = next_k, next_v
    return acc_out, acc_lse, rests


def ring_backward(plan: RingPlan, q, k, v, out, lse, dout, rests):
    n, me = len(plan.members), plan.me
    nxt, prv = plan.members[(me + 1) % n], plan.members[(me - 1) % n]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cur_k, cur_v = k.contiguous(), v.contiguous()
    pending = None  # (requests, dk, dv): the accumulators of the chunk arriving next
    for step in range(n):
        src = (me - step) % n
        kv_requests = []
        if step < n - 1:
            length = plan.shards[(me - step - 1) % n].length
            next_k, next_v = _kv_like(k, length), _kv_like(v, length)
            kv_requests = comm.exchange([(cur_k, nxt), (cur_v, nxt)], [(next_k, prv), (next_v, prv)], plan.group,
                                        plan.log)
        part_k = torch.zeros(cur_k.shape, dtype=torch.float32, device=k.device)
        part_v = torch.zeros(cur_v.shape, dtype=torch.float32, device=v.device)
        if step != plan.drop_chunk:
            attend_backward(plan.kernel, plan.tiles[src], q, cur_k, cur_v, out, lse, dout, plan.scale, rests, src,
                            dq, part_k, part_v)
        if pending is not None:
            comm.wait(pending[0])
            part_k += pending[1]
            part_v += pending[2]
        if n == 1:
            return dq, part_k, part_v
        origin = (me - step - 1) % n  # whose accumulators arrive from the previous rank
        length = plan.shards[origin].length
        buf_k = torch.empty(part_k.shape[:2] + (length, part_k.shape[-1]), dtype=torch.float32, device=k.device)
        buf_v = torch.empty_like(buf_k)
        pending = (comm.exchange([(part_k, nxt), (part_v, nxt)], [(buf_k, prv), (buf_v, prv)], plan.group, plan.log),
                   buf_k, buf_v)
        comm.wait(kv_requests)
        if step < n - 1:
            cur_k, cur_v = next_k, next_v
    comm.wait(pending[0])
    return dq, pending[1], pending[2]


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        out32, lse, rests = ring_forward(plan, q, k, v)
        out = out32.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.rests = plan, rests
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.plan, q, k, v, out, lse, dout.contiguous(), ctx.rests)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


# ---- all-gather ----------------------------------------------------------------------------------------
@dataclass
class GatherPlan:
    members: list[int]
    me: int
    lengths: list[int]
    tile: Tile
    kernel: ChunkKernel
    group: object
    log: comm.CommLog
    scale: float


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: GatherPlan):
        k_all = comm.all_gather_seq(k.contiguous(), plan.group, plan.lengths, plan.log)
        v_all = comm.all_gather_seq(v.contiguous(), plan.group, plan.lengths, plan.log)
        acc_out, acc_lse = _accumulators(q)
        rests: dict = {}
        attend(plan.kernel, plan.tile, q, k_all, v_all, plan.scale, acc_out, acc_lse, rests, 0)
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, k_all, v_all, out, acc_lse)
        ctx.plan, ctx.rests = plan, rests
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k_all, v_all, out, lse = ctx.saved_tensors
        plan = ctx.plan
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk_all = torch.zeros(k_all.shape, dtype=torch.float32, device=q.device)
        dv_all = torch.zeros(v_all.shape, dtype=torch.float32, device=q.device)
        attend_backward(plan.kernel, plan.tile, q, k_all, v_all, out, lse, dout.contiguous(), plan.scale, ctx.rests,
                        0, dq, dk_all, dv_all)
        dk = comm.reduce_scatter_seq(dk_all, plan.group, plan.lengths, plan.me, plan.log)
        dv = comm.reduce_scatter_seq(dv_all, plan.group, plan.lengths, plan.me, plan.log)
        return dq.to(q.dtype), dk.to(k_all.dtype), dv.to(v_all.dtype), None


# ---- builders ------------------------------------------------------------------------------------------
def _kernel(ctx: CPContext) -> ChunkKernel:
    try:
        return make_kernel(ctx.case.method, ctx.device, ctx.options)
    except KernelUnsupported as exc:
        raise LayoutUnsupported(str(exc)) from None


def _expand_kv_for(degree: int, case) -> bool:
    """Ulysses splits heads over ``degree`` ranks: key/value heads are repeated up to heads_q when they do
    not split evenly (GQA with fewer kv heads than ranks)."""
    if case.heads_q % degree:
        raise LayoutUnsupported(f"heads_q={case.heads_q} is not divisible by the Ulysses degree {degree}")
    return case.heads_kv % degree != 0


def build_usp(ctx: CPContext, degree: int, drop_chunk: int | None = None) -> BuiltLayout:
    """Ulysses groups of ``degree`` consecutive ranks x rings across them (degree 1: a plain ring)."""
    world, rank = ctx.world, ctx.rank
    rings = world // degree
    if degree * rings != world:
        raise LayoutUnsupported(f"ulysses degree {degree} does not divide the world size {world}")
    expand = _expand_kv_for(degree, ctx.case) if degree > 1 else False
    kernel = _kernel(ctx)
    ring_index, head_index = divmod(rank, degree)
    u_ranks = [ring_index * degree + t for t in range(degree)]
    # every rank creates every group in the same order
    u_groups = [subgroup([i * degree + t for t in range(degree)]) for i in range(rings)] if degree > 1 else []
    r_groups = [subgroup([t * degree + j for t in range(rings)]) for j in range(degree)] if rings > 1 else []
    u_group = u_groups[ring_index] if u_groups else None
    r_group = r_groups[head_index] if r_groups else None
    group_shards = [concat(ctx.shards[i * degree:(i + 1) * degree]) for i in range(rings)]
    u_lengths = [ctx.shards[r].length for r in u_ranks]
    plan = ring_plan(ctx.bound, [t * degree + head_index for t in range(rings)], ring_index, group_shards, kernel,
                     r_group, ctx.log, ctx.scale)
    plan.drop_chunk = drop_chunk
    pairs = sum(tile.visible_pairs for tile in plan.tiles.values())

    def fn(q, k, v):
        if degree > 1:
            if expand:
                k, v = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
            q, k, v = (comm.HeadsToSeq.apply(t.contiguous(), u_group, u_lengths, head_index, ctx.log)
                       for t in (q, k, v))
        out = RingAttention.apply(q, k, v, plan)
        if degree > 1:
            out = comm.SeqToHeads.apply(out.contiguous(), u_group, u_lengths, head_index, ctx.log)
        return out

    return BuiltLayout(fn, visible_pairs=pairs, notes=f"ulysses {degree} x ring {rings}")


def build_ring(ctx: CPContext) -> BuiltLayout:
    # negative control for the tests: cases with seed ``cp_drop_chunk_seed`` skip the keys of ring step 1
    drop = 1 if ctx.options.get("cp_drop_chunk_seed") == ctx.case.seed else None
    return build_usp(ctx, 1, drop_chunk=drop)


def build_allgather(ctx: CPContext) -> BuiltLayout:
    kernel = _kernel(ctx)
    everyone = concat(ctx.shards)
    try:
        tile = plan_tile(ctx.bound, ctx.shards[ctx.rank], everyone, kernel.any_mask)
    except TileUnsupported as exc:
        raise LayoutUnsupported(f"{kernel.name} kernel: {exc}") from None
    for call in tile.calls:
        kernel.prepare(call, ctx.bound)
    plan = GatherPlan(list(range(ctx.world)), ctx.rank, [s.length for s in ctx.shards], tile, kernel,
                      dist.group.WORLD, ctx.log, ctx.scale)
    return BuiltLayout(lambda q, k, v: AllGatherAttention.apply(q, k, v, plan), visible_pairs=tile.visible_pairs)


def build_prepared(ctx: CPContext, case=None):
    """The method's Prepared for ``case`` (default: the CP case, whole sequence); LayoutUnsupported when
    the method declines."""
    from attnbench.methods import METHODS, BuildContext, MaskInfo, Unsupported, as_prepared

    case = case or dataclasses.replace(ctx.case, layout="single", world_size=1)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[case.dtype]
    bound = ctx.bound.to(ctx.device)
    try:
        built = METHODS[case.method].build(BuildContext(
            case=case, mask=MaskInfo.of(bound), bound=bound, device=ctx.device, dtype=dtype, options=ctx.options,
            params=dict((ctx.options.get("method_options") or {}).get(case.method) or {})))
    except Unsupported as exc:
        raise LayoutUnsupported(f"{case.method}: {exc}") from None
    return as_prepared(built)


def _own_gated(ctx: CPContext, layout: str):
    """The whole-case Prepared of an approximate method (gated against its own reference), else None."""
    from attnbench.methods import METHODS

    if METHODS[ctx.case.method].caps.exact:
        return None
    prepared = build_prepared(ctx)
    if prepared.reference is None:
        raise LayoutUnsupported(f"approximate method {ctx.case.method} gives no reference to gate {layout} against")
    if prepared.parameters:
        raise LayoutUnsupported(f"{layout}: method {ctx.case.method} has learnable parameters, whose gradients the "
                                f"CP rank runner does not reduce over ranks")
    return prepared


def build_state_pass_layout(ctx: CPContext) -> BuiltLayout:
    from .statepass import build_state_pass

    prepared = _own_gated(ctx, "state_pass")
    if prepared is None:
        raise LayoutUnsupported(f"state_pass runs methods with a fixed-size recurrent state (linear family); "
                                f"{ctx.case.method} is softmax attention (ring, ulysses or usp run it)")
    from attnbench.methods import MaskInfo

    causal = not MaskInfo.of(ctx.bound).full  # the method's builder declined every mask but full and causal
    # negative controls for the tests (see ``statepass``)
    drop = ctx.options.get("cp_drop_state_seed") == ctx.case.seed
    detach = ctx.options.get("cp_detach_state_seed") == ctx.case.seed
    fn, token_extras = build_state_pass(ctx, prepared, causal, drop_incoming=drop, detach_incoming=detach)
    return BuiltLayout(fn, notes="state_pass: prefix scan of the recurrent state", prepared=prepared,
                       token_extras=token_extras)


def build_ulysses(ctx: CPContext) -> BuiltLayout:
    """Any registered method on the whole sequence for heads/W heads (the case's mask, natural order)."""
    from attnbench.methods import METHODS, BuildContext, MaskInfo, Unsupported, as_prepared

    case, world, rank = ctx.case, ctx.world, ctx.rank
    expand = _expand_kv_for(world, case)
    own = _own_gated(ctx, "ulysses")  # an approximate method: gated against its own reference
    if own is not None and (own.extras or own.prepare is not None):
        raise LayoutUnsupported(f"ulysses: method {case.method} takes extra inputs or prepared draws "
                                f"({', '.join(own.extras) or 'prepare'}), which this layout does not split over heads")
    heads_kv = case.heads_q if expand else case.heads_kv
    sub_case = dataclasses.replace(case, heads_q=case.heads_q // world, heads_kv=heads_kv // world,
                                   layout="single", world_size=1)
    method = METHODS[case.method]
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[case.dtype]
    try:
        bound = ctx.bound.to(ctx.device)
        built = method.build(BuildContext(case=sub_case, mask=MaskInfo.of(bound), bound=bound, device=ctx.device,
                                          dtype=dtype, options=ctx.options,
                                          params=dict((ctx.options.get("method_options") or {}).get(case.method) or {})))
        inner = as_prepared(built).fn  # ulysses runs the method's fast path on the gathered sequence
    except Unsupported as exc:
        raise LayoutUnsupported(f"{case.method} on the gathered sequence: {exc}") from None
    bshd = method.caps.input_layout == "bshd"
    lengths = [s.length for s in ctx.shards]
    gathered = concat(ctx.shards).positions(ctx.device)  # position of each gathered token
    natural = torch.argsort(gathered)  # gathered index of each position
    reorder = not torch.equal(gathered, torch.arange(len(gathered), device=ctx.device))
    group = dist.group.WORLD

    def fn(q, k, v):
        if expand:
            k, v = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
        q, k, v = (comm.HeadsToSeq.apply(t.contiguous(), group, lengths, rank, ctx.log) for t in (q, k, v))
        if reorder:
            q, k, v = (t.index_select(2, natural) for t in (q, k, v))
        if bshd:
            out = inner(*(t.transpose(1, 2).contiguous() for t in (q, k, v))).transpose(1, 2)
        else:
            out = inner(q, k, v)
        if reorder:
            out = out.index_select(2, gathered)
        return comm.SeqToHeads.apply(out.contiguous(), group, lengths, rank, ctx.log)

    return BuiltLayout(fn, notes="ulysses: the method runs the whole sequence on heads/W heads", prepared=own)


def build(ctx: CPContext) -> BuiltLayout:
    """The layout of ``ctx.spec`` on this rank; ``LayoutUnsupported`` with the reason where it cannot run."""
    name = ctx.spec.name
    if name in ADAPTERS:
        from . import adapters

        return adapters.build(ctx, name)
    if name == "ring":
        return build_ring(ctx)
    if name == "ring_allgather":
        return build_allgather(ctx)
    if name == "ulysses":
        return build_ulysses(ctx)
    if name == "usp":
        return build_usp(ctx, usp_degree(ctx.spec, ctx.world, ctx.case.heads_q))
    if name == "state_pass":
        return build_state_pass_layout(ctx)
    if name == "torch_cp":
        from .guard import build_torch_cp

        return build_torch_cp(ctx)
    raise LayoutUnsupported(f"layout {name} has no builder")


def shards_for(spec: LayoutSpec, case, bound) -> list[Shard]:
    try:
        return make_shards(spec.balance, case.seq_q, case.world_size, bound)
    except ValueError as exc:
        raise LayoutUnsupported(str(exc)) from None
