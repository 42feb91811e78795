"""flash-attn (FA2, and FA3 on Hopper) where the package is installed; listed as unavailable otherwise.

Inputs come in flash-attn's own ``[B, S, H, D]`` layout (the harness lays them out before timing). Masks
run natively through the mask's varlen form: one segment per batch element (full, causal bottom-right,
sliding windows) through ``flash_attn_func``; packed documents through ``flash_attn_varlen_func`` with
``cu_seqlens`` built once in the builder. GQA is native.
"""
from __future__ import annotations

import importlib

import torch

from ..registry import Capabilities, Unsupported, register_method


def varlen_form(ctx):
    """The case mask's varlen form; ``Unsupported`` where the mask has none."""
    form = ctx.bound.varlen()
    if form is None:
        raise Unsupported(f"mask {ctx.bound.label} has no varlen form (cu_seqlens + window)")
    return form


def batched_cu_seqlens(form, batch: int, seq_q: int, seq_kv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cu_seqlens`` for ``batch`` elements packed end to end, each with the mask's segments: the offsets
    repeat with a stride of the sequence length. int32 on ``device``."""
    base_q = form.cu_seqlens_q.to(device, torch.int32)
    base_k = form.cu_seqlens_k.to(device, torch.int32)
    cu_q = torch.cat([base_q[:-1] + b * seq_q for b in range(batch)] + [base_q[-1:] + (batch - 1) * seq_q])
    cu_k = torch.cat([base_k[:-1] + b * seq_kv for b in range(batch)] + [base_k[-1:] + (batch - 1) * seq_kv])
    return cu_q, cu_k


def _unwrap(out):
    return out[0] if isinstance(out, tuple) else out


def _make_flash(module_name: str):
    def build(ctx):
        module = importlib.import_module(module_name)
        form = varlen_form(ctx)
        batch = ctx.case.batch
        window = tuple(int(w) for w in form.window)
        segments = int(form.cu_seqlens_q.numel()) - 1
        if segments == 1:

            def flash(q, k, v):
                return _unwrap(module.flash_attn_func(q, k, v, causal=form.causal, window_size=window))

            return flash
        seq_q, seq_kv = ctx.case.seq_q, ctx.case.seq_kv
        cu_q, cu_k = batched_cu_seqlens(form, batch, seq_q, seq_kv, ctx.device)

        def flash_varlen(q, k, v):
            out = module.flash_attn_varlen_func(
                q.reshape(batch * seq_q, *q.shape[2:]),
                k.reshape(batch * seq_kv, *k.shape[2:]),
                v.reshape(batch * seq_kv, *v.shape[2:]),
                cu_q, cu_k, form.max_seqlen_q, form.max_seqlen_k,
                causal=form.causal, window_size=window,
            )
            return _unwrap(out).view(batch, seq_q, *q.shape[2:])

        return flash_varlen

    return build


_FLASH_CAPS = dict(
    family="exact", masks=set(), varlen=True, devices=("cuda",), dtypes=("float16", "bfloat16"),
    max_head_dim=256, input_layout="bshd", cross=True, gqa=True, backward=True, decode=True,
)

register_method(
    "flash_attn",
    Capabilities(**_FLASH_CAPS, requires=("flash_attn",)),
    description="flash-attn 2 (flash_attn_func / flash_attn_varlen_func)",
    options=(),
)(_make_flash("flash_attn"))

register_method(
    "flash_attn3",
    Capabilities(**_FLASH_CAPS, requires=("flash_attn_interface",)),
    description="FlashAttention-3 for Hopper (flash_attn_interface)",
    options=(),
)(_make_flash("flash_attn_interface"))
