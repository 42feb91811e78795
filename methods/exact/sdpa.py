"""PyTorch ``scaled_dot_product_attention``, one method per backend, each forced with ``sdpa_kernel``.

Native masks: full and causal (``is_causal`` for top-left alignment, ``causal_lower_right`` for bottom-right
when seq_q != seq_kv). Backends that take an ``attn_mask`` run every other mask from a dense boolean
tensor built once in the builder. A backend that declines the case raises PyTorch's "No available kernel"
error; the harness turns it into an ``unsupported`` row whose reason holds PyTorch's own warnings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..registry import Capabilities, Unsupported, register_method

DECLINES = ("No available kernel",)


def causal_offset(mask) -> int | None:
    """For a causal-family mask (query i sees keys j <= i + offset), the offset; None for other masks."""
    if mask.spec.name in ("causal", "decode"):
        return int(mask.offset)
    return None


def sdpa_mask_args(ctx, allow_dense: bool) -> dict:
    """Keyword arguments expressing ``ctx.bound`` for SDPA: nothing, is_causal, a causal bias, or a dense mask."""
    mask = ctx.bound
    if ctx.mask.full:
        return {}
    offset = causal_offset(mask)
    if offset == 0:
        return {"is_causal": True}
    if offset is not None and offset == mask.seq_kv - mask.seq_q:
        from torch.nn.attention.bias import causal_lower_right

        return {"attn_mask": causal_lower_right(mask.seq_q, mask.seq_kv)}
    if not allow_dense:
        raise Unsupported(f"{ctx.case.method} takes no attn_mask, and mask {mask.label} is neither full nor causal")
    return {"attn_mask": dense_bias(ctx)}


def dense_bias(ctx):
    """The mask in the form SDPA's backends run fastest, built once outside the timed region: an additive
    bias in the working dtype (0 visible, -inf hidden; cuDNN at 64K with a causal window: 119 ms against 128
    ms from a boolean mask). A mask with a query that sees no key stays boolean: an all -inf row would give
    NaN where the reference's rule is 0."""
    dense = ctx.bound.dense(ctx.device, max_bytes=ctx.options.get("dense_mask_bytes", 1 << 31))
    if not bool(dense.any(dim=-1).all()):
        return dense
    bias = torch.zeros(dense.shape, dtype=ctx.dtype, device=ctx.device)
    bias.masked_fill_(~dense, float("-inf"))
    del dense
    return bias


def _make_sdpa(backend, allow_dense: bool):
    def build(ctx):
        kwargs = sdpa_mask_args(ctx, allow_dense)
        if ctx.case.heads_kv != ctx.case.heads_q:
            kwargs["enable_gqa"] = True

        def sdpa(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)

        return sdpa

    return build


_COMMON = dict(family="exact", masks={"full", "causal", "decode"}, declines=DECLINES, cross=True, gqa=True,
               backward=True, decode=True)

register_method(
    "sdpa_math",
    Capabilities(**_COMMON, dense_mask=True, materializes=True),
    description="SDPA forced to its math backend (materialised, any dtype, any device)",
    options=(),
)(_make_sdpa(SDPBackend.MATH, allow_dense=True))

# the flash backend takes fp16/bf16 on CUDA (FlashAttention-2), fp32 too on the CPU flash kernel
FLASH_DTYPES = {"cuda": ("float16", "bfloat16")}

register_method(
    "sdpa_flash",
    Capabilities(**_COMMON, dtypes_by_device=FLASH_DTYPES),
    description="SDPA forced to its flash backend (FlashAttention-2 on CUDA, the flash CPU kernel on CPU)",
    options=(),
)(_make_sdpa(SDPBackend.FLASH_ATTENTION, allow_dense=False))

register_method(
    "sdpa_efficient",
    Capabilities(**_COMMON, dense_mask=True, devices=("cuda",)),
    description="SDPA forced to its memory-efficient (xformers-derived) backend",
    options=(),
)(_make_sdpa(SDPBackend.EFFICIENT_ATTENTION, allow_dense=True))

register_method(
    "sdpa_cudnn",
    Capabilities(**_COMMON, dense_mask=True, devices=("cuda",), dtypes=("float16", "bfloat16")),
    description="SDPA forced to its cuDNN backend",
    options=(),
)(_make_sdpa(SDPBackend.CUDNN_ATTENTION, allow_dense=True))
