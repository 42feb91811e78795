"""The inner kernel of a CP layout: attention of a query slice against a KV chunk, with its log-sum-exp.

``forward(q, k, v, call, scale) -> (out, lse, rest)``: ``out [B, Hq, lq, D]``, ``lse`` float32
``[B, Hq, lq]`` (natural log; ``-inf`` for rows that see no key of the call), ``rest`` whatever the
kernel's backward needs from its forward. ``backward(q, k, v, out, lse, dout, call, scale, rest)`` returns
``(dq, dk, dv)`` of this call's share of the *global* attention, given the global (merged) ``out`` and
``lse`` of the call's query rows — FlashAttention's identity: ``P = exp(S - lse_global)``,
``dS = P * (dP - rowsum(dout * out_global))``. Key/value gradients come back with ``Hkv`` heads.

Kernels (chosen by the case's method name):

* ``math`` (methods ``sdpa_math``, ``reference``, ``eager``; any device, any tile) — written out in float32
  (SDPA's math backend returns no log-sum-exp); backward by recomputation through autograd;
* ``flash`` / ``cudnn`` / ``efficient`` (``sdpa_flash`` — CUDA, or the flash CPU kernel on CPU —,
  ``sdpa_cudnn``, ``sdpa_efficient``) — PyTorch's private SDPA ops, which return the log-sum-exp and take
  it back in their backward ops; full and causal tiles only;
* ``flex`` (``flex``) — compiled FlexAttention (eager on CPU, forward only there) with the tile's own
  ``mask_mod`` at its positions and a ``BlockMask`` built from the mask's counts; backward by recomputing
  the tile with autograd through both outputs (FlexAttention differentiates its log-sum-exp).
"""
from __future__ import annotations

import math

import torch

from attnbench.masks.base import layout_from_block_flags

from .tiles import Call, PositionMask, visible_below

KERNEL_OF_METHOD = {
    "sdpa_math": "math", "reference": "math", "eager": "math",
    "sdpa_flash": "flash", "sdpa_cudnn": "cudnn", "sdpa_efficient": "efficient", "flex": "flex",
}


class KernelUnsupported(Exception):
    pass


def expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def fold_heads(grad: torch.Tensor, heads_kv: int) -> torch.Tensor:
    b, h, s, d = grad.shape
    group = h // heads_kv
    return grad if group == 1 else grad.view(b, heads_kv, group, s, d).sum(dim=2)


def merge_weight(call_lse: torch.Tensor, global_lse: torch.Tensor) -> torch.Tensor:
    """exp(call_lse - global_lse), 0 where either is -inf: the weight of a call's output in the merge."""
    ok = torch.isfinite(call_lse) & torch.isfinite(global_lse)
    return torch.where(ok, torch.exp(torch.where(ok, call_lse - global_lse, torch.zeros_like(call_lse))),
                       torch.zeros_like(call_lse))


class ChunkKernel:
    name = "?"
    any_mask = False  # takes tiles that are neither full nor causal

    def __init__(self, device: torch.device, options: dict | None = None):
        self.device = torch.device(device)
        self.options = options or {}

    def prepare(self, call: Call, bound) -> None:
        """Build what a call needs (a dense mask, a BlockMask) once, outside the timed region."""

    def forward(self, q, k, v, call: Call, scale: float):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, q, k, v, out, lse, dout, call: Call, scale: float, rest):
        """Recomputation: the call's (out, lse) again with autograd, and the merge's gradient through both."""
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            call_out, call_lse, _ = self.forward(*leaves, call, scale)
            weight = merge_weight(call_lse.detach().float(), lse)
            dout32 = dout.float()
            grad_out = weight[..., None] * dout32
            grad_lse = weight * (dout32 * (call_out.detach().float() - out.float())).sum(dim=-1)
            grads = torch.autograd.grad((call_out, call_lse), leaves,
                                        (grad_out.to(call_out.dtype), grad_lse.to(call_lse.dtype)),
                                        allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))


class MathKernel(ChunkKernel):
    """Softmax attention written out in float32: any tile (dense boolean mask of the tile's positions)."""

    name = "math"
    any_mask = True

    def prepare(self, call, bound):
        if call.kind == "masked" and "dense" not in call.cache:
            call.cache["dense"] = PositionMask(bound, call.q_pos, call.kv_pos).dense(self.device)

    def forward(self, q, k, v, call, scale):
        heads = q.shape[1]
        qf, kf, vf = q.float(), expand_heads(k.float(), heads), expand_heads(v.float(), heads)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        visible = None
        if call.kind == "causal":
            visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        elif call.kind == "masked":
            visible = call.cache["dense"]
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        top = scores.amax(dim=-1, keepdim=True).detach()
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        probs = torch.exp(scores - top)
        total = probs.sum(dim=-1, keepdim=True)
        seen = total > 0
        safe = torch.where(seen, total, torch.ones_like(total))
        out = torch.matmul(probs, vf) / safe
        lse = torch.where(seen, top + torch.log(safe), torch.full_like(total, float("-inf"))).squeeze(-1)
        return out, lse, None


class SdpaOpKernel(ChunkKernel):
    """PyTorch's private SDPA ops (they return the log-sum-exp): full and causal tiles only."""

    any_mask = False

    def __init__(self, backend: str, device, options=None):
        super().__init__(device, options)
        self.name = backend
        self.backend = backend
        if backend in ("cudnn", "efficient") and self.device.type != "cuda":
            raise KernelUnsupported(f"the {backend} SDPA kernel runs on CUDA only")

    def _qkv(self, q, k, v):
        heads = q.shape[1]
        return (q.contiguous(), expand_heads(k, heads).contiguous(), expand_heads(v, heads).contiguous())

    def forward(self, q, k, v, call, scale):
        aten = torch.ops.aten
        causal = call.kind == "causal"
        lq = q.shape[2]
        q, k, v = self._qkv(q, k, v)
        if self.backend == "flash" and self.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
            return out, lse.float(), None
        if self.backend == "flash":
            out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=scale)
            return out, lse.float(), (lse.dim(), lse.shape, cum_q, cum_k, max_q, max_k, seed, offset)
        if self.backend == "cudnn":
            out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False, scale=scale)
            native = lse.shape
            return out, lse.reshape(q.shape[0], q.shape[1], lq).float(), (native, cum_q, cum_k, max_q, max_k, seed,
                                                                         offset)
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                              scale=scale)
        native = lse.shape  # padded along the query axis
        return out, lse[..., :lq].float(), (native, seed, offset)

    def backward(self, q, k, v, out, lse, dout, call, scale, rest):
        aten = torch.ops.aten
        causal = call.kind == "causal"
        heads_kv = k.shape[1]
        q, k, v = self._qkv(q, k, v)
        out = out.to(q.dtype).contiguous()
        dout = dout.to(q.dtype).contiguous()
        # rows that see no key anywhere: no gradient; a finite stand-in keeps exp(S - lse) finite
        dead = ~torch.isfinite(lse)
        if bool(dead.any()):
            dout = dout.masked_fill(dead[..., None], 0)
        lse = torch.where(dead, torch.zeros_like(lse), lse).contiguous()
        if self.backend == "flash" and self.device.type == "cpu":
            dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse, 0.0, causal, scale=scale)
        elif self.backend == "flash":
            _, _, cum_q, cum_k, max_q, max_k, seed, offset = rest
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)
        elif self.backend == "cudnn":
            native, cum_q, cum_k, max_q, max_k, seed, offset = rest
            dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
                dout, q, k, v, out, lse.reshape(native).contiguous(), seed, offset, None, cum_q, cum_k, max_q, max_k,
                0.0, causal, scale=scale)
        else:
            native, seed, offset = rest
            padded = torch.zeros(native, dtype=torch.float32, device=lse.device)
            padded[..., : lse.shape[-1]] = lse
            dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
                dout, q, k, v, None, out, padded, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
        return dq, fold_heads(dk, heads_kv), fold_heads(dv, heads_kv)


def tile_block_mask(bound, call: Call, device, block: int):
    """A FlexAttention ``BlockMask`` for a masked call, from the mask's row counts at the call's positions
    (exact full / partial / empty blocks; no dense evaluation of the whole tile)."""
    from torch.nn.attention.flex_attention import BlockMask

    q_pos, kv_pos = call.q_pos.cpu(), call.kv_pos.cpu()
    lq, lk = len(q_pos), len(kv_pos)
    nkv = math.ceil(lk / block)
    # kv positions in local order are runs of consecutive positions; local edges of the kv blocks
    edges = torch.arange(0, nkv + 1) * block
    edges[-1] = lk
    breaks = torch.nonzero(kv_pos.diff() != 1).flatten() + 1
    run_starts = torch.cat([torch.zeros(1, dtype=torch.int64), breaks])
    run_ends = torch.cat([breaks, torch.tensor([lk])])
    cuts = torch.unique(torch.cat([edges, run_starts, run_ends]))  # local cut points: runs split at block edges
    pieces = list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
    piece_block = torch.tensor([a // block for a, _ in pieces])
    nq = math.ceil(lq / block)
    counts = torch.zeros(nq, nkv, dtype=torch.int64)
    for index, (a, b) in enumerate(pieces):
        seen = visible_below(bound, q_pos, int(kv_pos[b - 1]) + 1) - visible_below(bound, q_pos, int(kv_pos[a]))
        seen = torch.nn.functional.pad(seen, (0, nq * block - lq))
        counts[:, piece_block[index]] += seen.view(nq, block).sum(dim=1)
    rows_in = torch.clamp(lq - torch.arange(counts.shape[0]) * block, max=block)
    cols_in = edges.diff()
    full = counts == rows_in[:, None] * cols_in[None, :]
    partial = (counts > 0) & ~full
    layout = layout_from_block_flags(partial, full, block, block)
    position_mask = PositionMask(bound, call.q_pos, call.kv_pos).to(device)
    return BlockMask.from_kv_blocks(
        layout.kv_num_blocks[None, None].to(device), layout.kv_indices[None, None].to(device),
        layout.full_kv_num_blocks[None, None].to(device), layout.full_kv_indices[None, None].to(device),
        BLOCK_SIZE=block, mask_mod=position_mask.mask_mod, seq_lengths=(lq, lk))


class FlexKernel(ChunkKernel):
    """FlexAttention with the tile's own mask_mod (compiled on CUDA; eager, forward only, on CPU)."""

    name = "flex"
    any_mask = True

    def __init__(self, device, options=None):
        super().__init__(device, options)
        from torch.nn.attention import flex_attention as fa

        self.block = int(self.options.get("flex_block_size", 128))
        self.aux = getattr(fa, "AuxRequest", None)
        fn = fa.flex_attention
        if self.device.type == "cuda":
            import torch._dynamo

            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        self.fn = fn

    def prepare(self, call, bound):
        if call.kind == "masked" and "block_mask" not in call.cache:
            call.cache["block_mask"] = tile_block_mask(bound, call, self.device, self.block)
        elif call.kind == "causal" and "block_mask" not in call.cache:
            from torch.nn.attention.flex_attention import create_block_mask

            lq, lk = call.q1 - call.q0, call.k1 - call.k0
            call.cache["block_mask"] = create_block_mask(lambda b, h, i, j: j <= i, None, None, lq, lk,
                                                         device=self.device, BLOCK_SIZE=self.block)

    def forward(self, q, k, v, call, scale):
        kwargs = dict(block_mask=call.cache.get("block_mask"), scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        if self.aux is not None:
            out, aux = self.fn(q, k, v, return_aux=self.aux(lse=True), **kwargs)
            lse = aux.lse
        else:
            out, lse = self.fn(q, k, v, return_lse=True, **kwargs)
        return out, lse, None


def make_kernel(method: str, device, options=None) -> ChunkKernel:
    """The chunk kernel for a case's method; ``KernelUnsupported`` with the reason where there is none."""
    kind = KERNEL_OF_METHOD.get(method)
    if kind is None:
        raise KernelUnsupported(
            f"method {method} has no CP chunk kernel returning the log-sum-exp (CP kernels: "
            f"{', '.join(sorted(KERNEL_OF_METHOD))}); the ulysses layout runs any method")
    if kind == "math":
        return MathKernel(device, options)
    if kind == "flex":
        return FlexKernel(device, options)
    return SdpaOpKernel(kind, device, options)
