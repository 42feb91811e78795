"""PyTorch's own varlen attention, ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 kernels built
into torch, CUDA only): the FA-style varlen path that exists on every recent torch, also where the flash-attn
package is not installed.

Masks run natively through their varlen form (``BoundMask.varlen()``): packed documents, chunks, one segment
for full / causal / sliding windows. Inputs come in ``[B, S, H, D]``; the builder packs the batch into one
``[B * S, H, D]`` sequence with ``cu_seqlens`` built once, outside the timed region.

torch's API changed across versions: newer ones take ``window_size=(left, right)`` (causal is ``(-1, 0)``) and
``enable_gqa``, older ones only ``is_causal``. The builder reads the signature and refuses (``Unsupported``,
with the reason) what the installed version cannot express, never approximating it.

``varlen_reference`` is the readable statement of the kernel's contract (FlashAttention's windows, aligned
bottom-right inside each segment); the CPU tests run the method through the harness with it in place of the
CUDA kernel.
"""
from __future__ import annotations

import inspect
import math

import torch

from ..registry import Capabilities, Unsupported, register_method
from .flash_attn import batched_cu_seqlens, varlen_form

MODULE = "torch.nn.attention.varlen"


def _kernel():
    """The CUDA kernel entry point (tests swap this for ``varlen_reference``)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def torch_window(form) -> tuple[int, int]:
    """The mask's varlen window as torch's ``window_size``: a causal segment limits the right side to 0."""
    left, right = (int(w) for w in form.window)
    return (left, 0) if form.causal else (left, right)


def varlen_arguments(kernel, window: tuple[int, int], gqa: bool) -> dict:
    """Keyword arguments for ``kernel`` expressing ``window`` (and GQA), from its signature."""
    params = inspect.signature(kernel).parameters
    kwargs: dict = {}
    if "window_size" in params:
        kwargs["window_size"] = window
    elif "is_causal" in params:
        if window not in ((-1, -1), (-1, 0)):
            raise Unsupported(f"this torch's varlen_attn has no window_size (window {window} needs a newer torch)")
        kwargs["is_causal"] = window == (-1, 0)
    elif window != (-1, -1):
        raise Unsupported("this torch's varlen_attn takes neither window_size nor is_causal")
    if gqa:
        if "enable_gqa" not in params:
            raise Unsupported("this torch's varlen_attn has no enable_gqa (heads_kv != heads_q)")
        kwargs["enable_gqa"] = True
    return kwargs


def varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1),
                     enable_gqa=False, scale=None):
    """Packed ``[T, H, D]`` attention, segment by segment: query ``i`` of a segment of lengths (Lq, Lk) sits at
    key position ``i + Lk - Lq`` and sees keys within ``window_size = (left, right)`` of it (-1: unbounded)."""
    left, right = window_size
    outputs = []
    for start_q, end_q, start_k, end_k in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(),
                                              cu_seq_k[:-1].tolist(), cu_seq_k[1:].tolist()):
        q, k, v = (t.transpose(0, 1) for t in (query[start_q:end_q], key[start_k:end_k], value[start_k:end_k]))
        if k.shape[0] != q.shape[0]:
            if not enable_gqa:  # as the kernel: fewer key heads only with enable_gqa, never by broadcasting
                raise RuntimeError(f"{q.shape[0]} query heads, {k.shape[0]} key heads, enable_gqa=False")
            k, v = (t.repeat_interleave(q.shape[0] // t.shape[0], dim=0) for t in (k, v))
        position = torch.arange(end_q - start_q)[:, None] + (end_k - start_k) - (end_q - start_q)
        keys = torch.arange(end_k - start_k)[None, :]
        visible = torch.ones(position.shape[0], keys.shape[1], dtype=torch.bool)
        if left >= 0:
            visible &= keys >= position - left
        if right >= 0:
            visible &= keys <= position + right
        scores = (q @ k.transpose(-1, -2)) * (scale or 1.0 / math.sqrt(q.shape[-1]))
        weights = torch.softmax(scores.masked_fill(~visible.to(q.device), float("-inf")), dim=-1).nan_to_num()
        outputs.append((weights @ v).transpose(0, 1))
    return torch.cat(outputs)


@register_method(
    "torch_varlen",
    Capabilities(family="exact", masks=set(), varlen=True, devices=("cuda",), dtypes=("float16", "bfloat16"),
                 max_head_dim=256, input_layout="bshd", requires=(MODULE,), cross=True, gqa=True,
                 backward=True, decode=True),
    description="torch.nn.attention.varlen.varlen_attn (FlashAttention-2 in torch; documents, chunks, windows)",
    options=(),
)
def build(ctx):
    form = varlen_form(ctx)
    kernel = _kernel()
    case = ctx.case
    kwargs = varlen_arguments(kernel, torch_window(form), gqa=case.heads_kv != case.heads_q)
    batch, seq_q, seq_kv = case.batch, case.seq_q, case.seq_kv
    cu_q, cu_k = batched_cu_seqlens(form, batch, seq_q, seq_kv, ctx.device)
    max_q, max_k = int(form.max_seqlen_q), int(form.max_seqlen_k)

    def torch_varlen(q, k, v):
        out = kernel(q.reshape(batch * seq_q, *q.shape[2:]), k.reshape(batch * seq_kv, *k.shape[2:]),
                     v.reshape(batch * seq_kv, *v.shape[2:]), cu_q, cu_k, max_q, max_k, **kwargs)
        return out.view(batch, seq_q, *q.shape[2:])

    return torch_varlen
