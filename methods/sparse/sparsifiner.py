"""Sparsifiner: learned instance-dependent sparse attention masks (Wei et al., CVPR 2023, arXiv:2303.13755;
methods-spec §6).

A low-rank *connectivity predictor* proposes, per query, the keys worth attending:

1. channel reduction ``q' = q W_cq``, ``k' = k W_ck`` (``D -> D / channel_reduction``, shared over heads);
2. token reduction of the keys ``K_low = k'^T P_n`` (``P_n [N, N / token_reduction]``, learned);
3. basis coefficients ``Cf = softmax(s q' K_low)`` with ``s = heads^-1/2`` (the reference code's scale),
   keeping the ``basis_topk`` largest per row (inference form);
4. approximate attention ``A_hat = Cf . Bs`` with ``Bs = |P_back| thresholded at `threshold` `` (sparse);
5. mask: per query the ``ceil(keep_rate * N)`` columns of ``A_hat`` with the largest values (no gradient);
6. attention: softmax of ``tau q k^T`` over the mask.

The predictor's parameters get no gradient from the output (the mask is detached; the paper trains them with
a reconstruction loss), so they are not listed as parameters of the backward. ``P_n`` and ``P_back`` tie the
method to one key length N: each case builds them for its ``seq_kv`` (cross attention with a free
``seq_q`` is fine). ``A_hat`` is ``Lq x N``: the method stays quadratic (it cuts FLOPs, not the order), so
cases above ``max_seq`` are refused. Non-causal only: ``K_low`` mixes every key position, so a causal
variant would leak future keys into the mask (the harness's leak probe would flag it).

Fast path: the predicted mask (bool ``[B, H, Lq, N]``, built in row chunks) through SDPA with a boolean
``attn_mask`` (memory-efficient kernel on CUDA). Reference: the same mask, masked softmax written out.

Options: ``keep_rate`` (0.25, in (0, 1]), ``token_reduction`` (8), ``channel_reduction`` (2), ``basis_topk``
(8), ``threshold`` (0.02), ``max_seq`` (16384).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..registry import Capabilities, Unsupported, register_method
from .common import Options, parameter, pattern_reference, row_chunks


def predict_mask(q, k, w_cq, w_ck, p_n, p_back, keep: int, basis_topk: int, threshold: float, rows=None):
    """The connectivity predictor, fp32: bool mask ``[B, H, len(rows), N]`` of the keys each query keeps."""
    heads = q.shape[1]
    qf, kf = q.float(), k.float()
    k_low = torch.matmul((kf @ w_ck.float()).transpose(-1, -2), p_n.float())  # [B, H, D', N']
    bs = p_back.float().abs()
    bs = bs * (bs >= threshold)  # [N', N]
    idx = torch.arange(q.shape[2], device=q.device) if rows is None else rows.to(q.device)
    masks = []
    for chunk in row_chunks(idx, q.shape[0] * heads * k.shape[2] * 2):
        coeff = torch.softmax(torch.matmul(qf[:, :, chunk] @ w_cq.float(), k_low) * heads ** -0.5, dim=-1)
        top = coeff.topk(min(basis_topk, coeff.shape[-1]), dim=-1)
        coeff = torch.zeros_like(coeff).scatter_(-1, top.indices, top.values)
        approx = coeff @ bs  # [B, H, R, N]
        chosen = approx.topk(keep, dim=-1).indices
        masks.append(torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, chosen, True))
    return torch.cat(masks, dim=2)


@register_method(
    "sparsifiner",
    Capabilities(family="sparse", exact=False, masks={"full"}, cross=True, backward=True),
    description="Sparsifiner: low-rank connectivity predictor, top-k sparse mask per query, attention on it "
                "(SDPA with the boolean mask)",
    options=("keep_rate", "token_reduction", "channel_reduction", "basis_topk", "threshold", "max_seq"),
)
def build_sparsifiner(ctx):
    case = ctx.case
    opts = Options(ctx, "sparsifiner")
    keep_rate = opts.float("keep_rate", 0.25, minimum=0.0, maximum=1.0, exclusive_min=True)
    token_reduction = opts.int("token_reduction", 8, minimum=1)
    channel_reduction = opts.int("channel_reduction", 2, minimum=1)
    basis_topk = opts.int("basis_topk", 8, minimum=1)
    threshold = opts.float("threshold", 0.02, minimum=0.0)
    max_seq = opts.int("max_seq", 16384, minimum=1)
    n, dim = case.seq_kv, case.head_dim
    if max(case.seq_q, n) > max_seq:
        raise Unsupported(f"the predicted attention A_hat is seq_q x seq_kv and P_n, P_back are seq_kv x "
                          f"seq_kv/{token_reduction}: lengths above method_options.sparsifiner.max_seq={max_seq} "
                          "are refused")
    if token_reduction > n:
        opts.unfit("token_reduction", f"must be <= seq_kv {n}, got {token_reduction} (the case is shorter)")
    if channel_reduction > dim:
        opts.unfit("channel_reduction", f"must be <= head_dim {dim}, got {channel_reduction} (the case's head is narrower)")
    reduced, low = dim // channel_reduction, max(1, n // token_reduction)
    keep = math.ceil(keep_rate * n)
    w_cq = parameter(ctx, "sparsifiner.wcq", (dim, reduced), dim ** -0.5, grad=False)
    w_ck = parameter(ctx, "sparsifiner.wck", (dim, reduced), dim ** -0.5, grad=False)
    p_n = parameter(ctx, "sparsifiner.pn", (n, low), n ** -0.5, grad=False)
    p_back = parameter(ctx, "sparsifiner.pback", (low, n), 0.02, grad=False)

    def routing(q, k, v, rows=None):
        return predict_mask(q, k, w_cq, w_ck, p_n, p_back, keep, basis_topk, threshold, rows)

    def fn(q, k, v):
        mask = routing(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def reference(q, k, v, rows=None):
        mask = routing(q, k, v)  # every row (the chunked predictor), then the requested rows

        def allowed(idx):
            return mask[:, :, idx]

        return pattern_reference(q, k, v, allowed, rows)

    pairs = case.batch * case.heads_q * case.seq_q * keep
    return Prepared(fn=fn, reference=reference, attended_pairs=lambda q, k, v: pairs,
                    phases={"routing": routing})
