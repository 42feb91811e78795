"""``flex_split``: the Sparse Transformer masks, split into parts that block-sparse kernels run densely, merged
by log-sum-exp. Exact.

FlexAttention skips a 128x128 tile only when no pair in it is visible. A strided pattern touches every tile
(each query sees every ``stride``-th key), so plain ``flex`` does the work of causal attention for a density
of a few per cent (8-42 TFLOP/s of useful work on the H200, ``results/README.md``). Splitting the mask into
disjoint parts whose visible pairs sit in dense tiles — after a permutation of the tokens where needed —
makes every tile count:

- ``sparse_strided(stride=s)``: the local part (distance 0 .. s-1) is a causal sliding window; the strided
  part (distance s, 2s, ...) becomes, after grouping positions by their residue ``p mod s``, a strictly
  causal attention inside each group: ``s`` independent sequences of ``L / s`` tokens, moved into the batch.
- ``sparse_fixed(stride=s, summary=c)``: the local part is causal attention inside each chunk; the summary
  part is attention to the gathered last ``c`` keys of every *earlier* chunk, a block-causal pattern on an
  ``L x (L / s) c`` problem.

Each part is one compiled ``flex_attention`` call that also returns its log-sum-exp; the outputs merge as
``sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i``, in fp32. Rows a part does not reach have
``lse = -inf`` and weigh nothing. Gradients flow through both outputs and log-sum-exps, so ``fwd_bwd`` is
exact too. Everything around the two calls (permutations, gathers, the merge) is compiled with them.

``ATTEND`` is the primitive (q, k, v, block_mask, enable_gqa) -> (out, lse); the CPU tests swap in a dense
one to test the decomposition and the merge, gradients included, through the harness.
"""
from __future__ import annotations

import torch

from ..registry import Capabilities, Unsupported, register_method
from .flex import allow_backward_replay, fresh_compile


def flex_attend(q, k, v, block_mask, enable_gqa):
    """Compiled-graph primitive: FlexAttention with its log-sum-exp (natural log; -inf on empty rows)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa, return_lse=True)


ATTEND = flex_attend


def merge(parts) -> torch.Tensor:
    """Exact union of disjoint parts ``[(out [B,H,L,D], lse [B,H,L]), ...]`` of one softmax, in fp32."""
    lses = torch.stack([lse.float() for _, lse in parts])
    top = lses.max(dim=0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows no part reaches stay zero
    weights = torch.exp(lses - top)
    total = weights.sum(dim=0)
    out = sum(w[..., None] * o.float() for w, (o, _) in zip(weights, parts))
    return (out / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).to(parts[0][0].dtype)


def _block_mask(mask_mod, seq_q: int, seq_kv: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, None, None, seq_q, seq_kv, device=device)


def strided_parts(length: int, stride: int, device):
    """Block masks of the two parts of ``sparse_strided`` and the function that runs and merges them."""
    from attnbench.masks import make_mask

    groups = length // stride
    local = make_mask(f"sliding_window(left={stride - 1})").bind(length).block_mask(device)
    strict = _block_mask(lambda b, h, q_idx, kv_idx: kv_idx < q_idx, groups, groups, device)

    def run(q, k, v, gqa):
        batch, heads, _, dim = q.shape

        def by_residue(t):  # [B, h, L, D] -> [B * s, h, L / s, D]: group r holds positions r, r + s, r + 2s, ...
            return t.reshape(batch, t.shape[1], groups, stride, dim).permute(0, 3, 1, 2, 4).reshape(
                batch * stride, t.shape[1], groups, dim)

        out_local, lse_local = ATTEND(q, k, v, local, gqa)
        out_far, lse_far = ATTEND(by_residue(q), by_residue(k), by_residue(v), strict, gqa)
        out_far = out_far.reshape(batch, stride, heads, groups, dim).permute(0, 2, 3, 1, 4).reshape(q.shape)
        lse_far = lse_far.reshape(batch, stride, heads, groups).permute(0, 2, 3, 1).reshape(q.shape[:-1])
        return merge([(out_local, lse_local), (out_far, lse_far)])

    return run


def fixed_parts(length: int, stride: int, summary: int, device):
    """Block masks of the two parts of ``sparse_fixed`` and the function that runs and merges them."""
    from attnbench.masks import make_mask

    chunks = length // stride
    local = make_mask(f"chunked_local(chunk={stride})").bind(length).block_mask(device)
    earlier = _block_mask(lambda b, h, q_idx, kv_idx: kv_idx // summary < q_idx // stride, length,
                          chunks * summary, device)

    def run(q, k, v, gqa):
        def summaries(t):  # the last `summary` keys of every chunk: [B, h, (L / s) * c, D]
            b, h, _, d = t.shape
            return t.reshape(b, h, chunks, stride, d)[:, :, :, stride - summary:, :].reshape(b, h, chunks * summary, d)

        out_local, lse_local = ATTEND(q, k, v, local, gqa)
        out_summary, lse_summary = ATTEND(q, summaries(k), summaries(v), earlier, gqa)
        return merge([(out_local, lse_local), (out_summary, lse_summary)])

    return run


@register_method(
    "flex_split",
    Capabilities(family="exact", masks={"sparse_strided", "sparse_fixed"}, cross=False, decode=False,
                 compiled=True, gqa=True, backward=True),
    description="FlexAttention on Sparse Transformer masks split into dense-tile parts, merged by log-sum-exp",
    options=(),
)
def build_flex_split(ctx):
    case, spec = ctx.case, ctx.bound.spec
    if case.seq_q != case.seq_kv:
        raise Unsupported(f"self attention only (seq_q={case.seq_q} != seq_kv={case.seq_kv})")
    if case.seq_q % spec.stride:
        raise Unsupported(f"seq {case.seq_q} is not a multiple of stride {spec.stride}")
    compiled = ATTEND is flex_attend
    if compiled and ctx.device.type == "cpu":
        raise Unsupported("compiled FlexAttention on CPU cannot return the log-sum-exp the merge needs")
    if spec.name == "sparse_strided":
        run = strided_parts(case.seq_q, spec.stride, ctx.device)
    elif spec.name == "sparse_fixed":
        run = fixed_parts(case.seq_q, spec.stride, spec.summary, ctx.device)
    else:
        raise Unsupported(f"mask {spec.name} has no split here")
    gqa = case.heads_kv != case.heads_q
    allow_backward_replay(case)
    fn = fresh_compile(run) if compiled else run

    def flex_split(q, k, v):
        return fn(q, k, v, gqa)

    return flex_split
