"""Routing Transformer: online k-means routing attention (Roy et al., TACL 2021, arXiv:2003.05997;
methods-spec §3).

Per head, ``clusters`` centroids route tokens: similarities ``s = normalize(x) . mu`` (unit centroids);
every cluster takes the ``w = L / clusters`` tokens most similar to it (top-w over the sequence: balanced
clusters), sorted by position; attention runs inside each cluster among its gathered tokens; a token's output
is the mean of the outputs of the clusters that took it (0 for a token no cluster took - in the paper those
are served by the local heads of the layer).

- ``share_qk=true`` (default, the paper's): tokens are clustered by their normalised *query*; the cluster's
  queries and keys are the same tokens. Causal: lower-triangular inside each cluster in position order. (As
  in the paper, top-w membership is decided over the whole sequence, so a past token's cluster depends on
  later queries - the train/inference mismatch the spec notes; keys and values never leak.)
- ``share_qk=false``: queries and keys are clustered separately against the same centroids (lucidrains'
  ``receives_context``): non-causal only; cross attention (``seq_q != seq_kv``) needs it.

Centroids are state: drawn once per input in the untimed preparation (unit normal rows, seeded), then updated
by EMA k-means in the timed call (training-time cost, no gradient): sums and counts of the tokens each centroid
wins (argmax) decay with ``ema_decay`` (0.999); ``mu = ema_sum / ema_count``, normalised. The update is kept on
the method (``state``) and never changes the output of the call that made it, so fast path and reference
route with the same centroids.

Fast path (gather-dense): cluster members are gathered by row index (``index_select`` on ``[B*H*L, D]``) into
tiles ``[B, H * clusters, w, D]``, run through SDPA (cuDNN first; causal tiles are square), and scattered back
with ``index_add`` in fp32, divided by the membership counts.

Options: ``clusters`` (default ``2^round(log2(L)/2)``, about sqrt(L); must divide seq_q and seq_kv),
``share_qk`` (true), ``ema_decay`` (0.999, in [0, 1)), ``update_centroids`` (true).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..registry import Capabilities, Unsupported, register_method
from .common import Options, masked_attention, sdpa_tiles

SIM_CHUNK_ELEMS = 1 << 28  # similarity entries per routing chunk (fp32): bounds routing memory at 1M tokens


def route(x: torch.Tensor, centroids: torch.Tensor, window: int):
    """Balanced routing of ``x [B, H, L, D]`` to ``centroids [H, C, D]`` (unit rows), from fp32 scores.

    Returns ``(members [B, H, C, window] long, ascending positions; assign [B, H, L] long, argmax cluster)``.
    All batch rows at once (the centroids broadcast over the batch), in head chunks so the similarity matrix
    ``[B, h, C, L]`` stays under ``SIM_CHUNK_ELEMS`` (one chunk up to 2^28 entries: 64K tokens x 256
    clusters x 16 heads); no python loop over batch rows or clusters."""
    batch, heads, length, _ = x.shape
    n_clusters = centroids.shape[1]
    per = max(1, SIM_CHUNK_ELEMS // (batch * length * n_clusters))
    members, assign = [], []
    for h0 in range(0, heads, per):
        xs = F.normalize(x[:, h0:h0 + per].float(), dim=-1)  # [B, h, L, D]
        sim = torch.matmul(centroids[h0:h0 + per].float(), xs.transpose(-1, -2))  # [B, h, C, L]
        members.append(sim.topk(window, dim=-1).indices.sort(dim=-1).values)
        assign.append(sim.argmax(dim=2))
    if len(members) == 1:
        return members[0], assign[0]
    return torch.cat(members, dim=1), torch.cat(assign, dim=1)


def ema_update(state: dict, x: torch.Tensor, assign: torch.Tensor, decay: float) -> torch.Tensor:
    """One EMA k-means step (no gradient): decayed sums and counts of the normalised tokens each centroid
    won; returns the new unit centroids ``[H, C, D]`` (and updates ``state['sum']``, ``state['count']``)."""
    with torch.no_grad():
        xs = F.normalize(x.float(), dim=-1)  # [B, H, L, D]
        batch, heads, length, dim = xs.shape
        n_clusters = state["sum"].shape[1]
        sums = torch.zeros(heads, n_clusters, dim, device=x.device)
        sums.scatter_add_(1, assign.transpose(0, 1).reshape(heads, batch * length, 1).expand(-1, -1, dim),
                          xs.transpose(0, 1).reshape(heads, batch * length, dim))
        counts = torch.zeros(heads, n_clusters, device=x.device)
        counts.scatter_add_(1, assign.transpose(0, 1).reshape(heads, batch * length),
                            torch.ones(heads, batch * length, device=x.device))
        state["sum"] = decay * state["sum"] + (1 - decay) * sums
        state["count"] = decay * state["count"] + (1 - decay) * counts
        return F.normalize(state["sum"] / state["count"].clamp_min(1e-6)[..., None], dim=-1)


# ---- the readable reference ------------------------------------------------------------------------------------
def routing_reference(q, k, v, members_q, members_k, causal: bool, rows=None):
    """For every (query row, cluster that took it): softmax over the cluster's keys (those at or before the
    row when causal), written out on the gathered keys; the row's output is the mean over its clusters."""
    batch, heads, seq_q, dim = q.shape
    device = q.device
    idx = torch.arange(seq_q, device=device) if rows is None else rows.to(device)
    # (b, h, c, r) for every cluster c that took query row idx[r]
    wanted = idx.expand(*members_q.shape[:3], idx.numel()).contiguous()
    slot = torch.searchsorted(members_q, wanted).clamp_max(members_q.shape[-1] - 1)  # members are ascending
    took = members_q.gather(3, slot) == wanted  # [B, H, C, R]
    b, h, c, r = took.nonzero(as_tuple=True)
    keys = members_k[b, h, c]  # [T, w_k] key positions of each cluster
    q_t = q[b, h, idx[r]][:, None, None, :]  # [T, 1, 1, D]
    k_t = k[b[:, None], h[:, None], keys][:, None]  # [T, 1, w_k, D]
    v_t = v[b[:, None], h[:, None], keys][:, None]
    allowed = torch.ones_like(keys, dtype=torch.bool)
    if causal:
        allowed = keys <= idx[r][:, None]
    per_cluster = masked_attention(q_t, k_t, v_t, allowed[:, None, None, :], 1.0 / math.sqrt(dim))[:, 0, 0]
    out = torch.zeros(batch, heads, idx.numel(), v.shape[-1], dtype=q.dtype, device=device)
    flat = (b * heads + h) * idx.numel() + r
    out = out.reshape(-1, v.shape[-1]).index_add(0, flat, per_cluster).reshape(out.shape)
    count = took.sum(dim=2).to(q.dtype)  # [B, H, R]
    return out / count.clamp_min(1)[..., None]


# ---- the fast path ----------------------------------------------------------------------------------------
def flat_rows(members: torch.Tensor, length: int) -> torch.Tensor:
    """Positions ``[B, H, C, w]`` as row indices into a ``[B * H * length, D]`` view."""
    batch, heads = members.shape[:2]
    offset = (torch.arange(batch * heads, device=members.device) * length).reshape(batch, heads, 1, 1)
    return (members + offset).reshape(-1)


def routing_fast(q, k, v, members_q, members_k, causal: bool) -> torch.Tensor:
    batch, heads, seq_q, dim = q.shape
    seq_kv = k.shape[2]
    n_clusters, w_q, w_k = members_q.shape[2], members_q.shape[3], members_k.shape[3]
    rows_q = flat_rows(members_q, seq_q)
    rows_k = rows_q if members_k is members_q else flat_rows(members_k, seq_kv)

    def gather(t, rows, w):
        return t.reshape(-1, t.shape[-1]).index_select(0, rows).reshape(batch, heads * n_clusters, w, t.shape[-1])

    out = sdpa_tiles(gather(q, rows_q, w_q), gather(k, rows_k, w_k), gather(v, rows_k, w_k),
                     causal="square" if causal else None)
    total = torch.zeros(batch * heads * seq_q, v.shape[-1], dtype=torch.float32, device=q.device)
    total = total.index_add(0, rows_q, out.reshape(-1, v.shape[-1]).float())
    count = torch.bincount(rows_q, minlength=batch * heads * seq_q).clamp_min(1)
    return (total / count[:, None]).to(q.dtype).reshape(batch, heads, seq_q, v.shape[-1])


@register_method(
    "routing",
    Capabilities(family="sparse", exact=False, masks={"full", "causal"}, cross=True, backward=True),
    description="Routing Transformer: balanced online k-means clusters (EMA centroids), attention inside "
                "clusters (SDPA tiles)",
    options=("clusters", "share_qk", "ema_decay", "update_centroids"),
)
def build_routing(ctx):
    case, causal = ctx.case, ctx.mask.causal
    opts = Options(ctx, "routing")
    auto = 2 ** round(math.log2(max(case.seq_q, 1)) / 2)
    n_clusters = opts.int("clusters", None, minimum=1, allow_none=True) or auto
    share_qk = opts.bool("share_qk", True)
    decay = opts.float("ema_decay", 0.999, minimum=0.0, maximum=1.0)
    if decay >= 1.0:
        opts.fail("ema_decay", f"must be < 1, got {decay}")
    update = opts.bool("update_centroids", True)
    if n_clusters > min(case.seq_q, case.seq_kv):
        opts.unfit("clusters", f"must be <= the sequence length ({min(case.seq_q, case.seq_kv)}), got {n_clusters}")
    if case.seq_q != case.seq_kv and share_qk:
        raise Unsupported("cross attention clusters queries and keys apart: set method_options.routing.share_qk=false")
    if causal and not share_qk:
        raise Unsupported("the causal form shares query/key clusters (method_options.routing.share_qk=true)")
    for name, length in (("seq_q", case.seq_q), ("seq_kv", case.seq_kv)):
        if length % n_clusters:
            raise Unsupported(f"{name}={length} is not a multiple of method_options.routing.clusters={n_clusters} "
                              "(balanced clusters; lengths are not padded)")
    w_q, w_k = case.seq_q // n_clusters, case.seq_kv // n_clusters
    heads, dim = case.heads_q, case.head_dim
    state: dict = {}

    def prepare(q, k, v):
        gen = torch.Generator(device="cpu").manual_seed(case.seed * 7919 + 17)
        centroids = F.normalize(torch.randn(heads, n_clusters, dim, generator=gen), dim=-1).to(q.device)
        state.update(sum=centroids.clone(), count=torch.ones(heads, n_clusters, device=q.device))
        return {"centroids": centroids}

    def routing(q, k, v, centroids):
        members_q, assign = route(q, centroids, w_q)
        members_k = members_q if share_qk else route(k, centroids, w_k)[0]
        return members_q, members_k, assign

    def fn(q, k, v, centroids):
        members_q, members_k, assign = routing(q, k, v, centroids)
        out = routing_fast(q, k, v, members_q, members_k, causal)
        if update:
            state["centroids"] = ema_update(state, q, assign, decay)
        return out

    def reference(q, k, v, centroids, rows=None):
        members_q, members_k, _ = routing(q, k, v, centroids)
        return routing_reference(q, k, v, members_q, members_k, causal, rows)

    per_cluster = w_q * (w_q + 1) // 2 if causal else w_q * w_k
    pairs = per_cluster * n_clusters * case.batch * heads
    prepared = Prepared(fn=fn, reference=reference, prepare=prepare, phases={"routing": routing},
                        attended_pairs=lambda q, k, v, centroids: pairs)
    prepared.state = state  # the EMA k-means state (tests read it)
    return prepared
