"""Linear attention (Katharopoulos et al., 2020, arXiv:2006.16236): the feature map ``φ(x) = elu(x) + 1``
on q and k, no 1/√d scale, ``eps = 1e-6`` (methods-spec §12a).

A different kernel from softmax (class N): rows say ``approx_err_na(different_operator)``; its quality
comes from the tasks. Forms: quadratic masked reference, chunked parallel form (``chunk``, default 128),
recurrent decode with an O(m · dv) state (m = head_dim). Hyper-parameters: ``chunk``, ``eps``,
``compute_dtype`` (matmul dtype of the chunked form, default float32; states are always fp32),
``reference_naive_max_pairs``. ``impl``: ``chunked`` (default) or ``triton`` (the features computed in PyTorch,
then the own Triton scan with identity features: the kernelised methods' option, methods/linear/common.py;
``linear_attn_triton`` below fuses elu+1 into its kernels instead).

``linear_attn_triton`` is the same operator (same features, eps and normalisation, gated against the same
reference) through own Triton kernels (``linear_triton.py``: chunked scan, forward and backward), a separate
method rather than an option of ``linear_attn`` because its capabilities differ (causal self-attention only,
CUDA or the Triton interpreter, no decode rows: the recurrent step is ``linear_attn``'s) and the sweep puts
both, and fla's kernel, side by side. Hyper-parameters: ``chunk`` (constexpr chunk length, power of two in
16..256, default 64), ``block_v`` (value columns per program, default 64), ``seg_chunks`` (chunks per
parallel segment, default 4: the fp32 states stored per segment cost T / (chunk · seg_chunks) · d² · 4 B per
kv head), ``num_warps`` (default 4), ``feature_map`` (``precomputed``, the default: φ(q), φ(k) written once
and kept for the backward; ``fused``: φ applied in the kernels as q, k are loaded), ``eps``, ``reference_naive_max_pairs``, ``reference_stream_chunk`` (keys
per step of the reference's ``rows=`` form, which long cases are gated on). On a CPU without
``TRITON_INTERPRET=1`` its rows are ``unsupported``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..registry import Capabilities, register_method
from .common import KERNELIZED_CAPS, KERNELIZED_OPTIONS, expand_heads, kernelized


def elu_features(q, k, v, q_pos=None, k_pos=None):
    heads = q.shape[1]
    fq = F.elu(q.float()) + 1.0
    fk = F.elu(expand_heads(k, heads).float()) + 1.0
    return fq, fk, expand_heads(v, heads)


@register_method("linear_attn", Capabilities(**KERNELIZED_CAPS, prefix_closed=True), options=KERNELIZED_OPTIONS)
def build_linear_attn(ctx):
    """Linear attention, elu+1 features (chunked PyTorch form; O(d²) recurrent decode)."""
    return kernelized(ctx, elu_features, softmax_comparable=False, feature_width=ctx.case.head_dim)


TRITON_CAPS = dict(family="linear", exact=False, masks={"causal"}, causal_only=True, gqa=True, backward=True,
                   requires=("triton",), max_head_dim=256, prefix_closed=True)


def triton_runnable(device) -> str | None:
    """None when a Triton kernel can run on ``device`` (CUDA, or any device under ``TRITON_INTERPRET=1``),
    else the reason it cannot (the case is then ``unsupported``: there is no silent fallback to PyTorch)."""
    if torch.device(device).type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    return (f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for Triton's CPU interpreter); "
            f"device is {torch.device(device).type}")


def triton_by_default(device) -> bool:
    """Where an ``auto`` option takes an own Triton kernel: a CUDA device on which it runs; never the CPU, where
    the interpreter would run it far slower than PyTorch (probsparse's ``measure``, the delta rules' ``impl`` and
    ``solve``)."""
    return torch.device(device).type == "cuda" and not triton_runnable(device)


@register_method("linear_attn_triton", Capabilities(**TRITON_CAPS),
                 options=("chunk", "block_v", "num_warps", "seg_chunks", "feature_map", "eps",
                          "reference_naive_max_pairs", "reference_stream_chunk"))
def build_linear_attn_triton(ctx):
    """Linear attention, elu+1 features: own chunked Triton kernels (forward and backward), causal self."""
    from ..contract import Prepared
    from ..registry import Unsupported
    from .common import STREAM_CHUNK, feature_rows, linear_reference, mask_mode, param_choice, param_float, param_int

    causal, offset = mask_mode(ctx)
    if not causal or offset != 0 or ctx.case.seq_q != ctx.case.seq_kv:
        raise Unsupported("linear_attn_triton runs causal self-attention only")
    chunk = param_int(ctx, "chunk", 64, minimum=16, maximum=256, power_of_two=True)
    block_v = param_int(ctx, "block_v", 64, minimum=16, maximum=256, power_of_two=True)
    num_warps = param_choice(ctx, "num_warps", 4, (1, 2, 4, 8, 16))
    seg_chunks = param_int(ctx, "seg_chunks", 4, minimum=1, maximum=1024)
    feature_map = param_choice(ctx, "feature_map", "precomputed", ("precomputed", "fused"))
    eps = param_float(ctx, "eps", 1e-6, minimum=0.0)
    naive_max = param_int(ctx, "reference_naive_max_pairs", 1 << 26)
    stream = param_int(ctx, "reference_stream_chunk", STREAM_CHUNK)
    why = triton_runnable(ctx.device)
    if why:
        raise Unsupported(f"linear_attn_triton: {why}")
    from .linear_triton import linear_attn as kernel

    reference_form = linear_reference(naive_max, chunk)

    def fn(q, k, v):
        return kernel(q, k, v, chunk=chunk, block_v=block_v, eps=eps, num_warps=num_warps, seg_chunks=seg_chunks,
                      feature_map=feature_map)

    def reference(q, k, v, rows=None):
        if rows is not None:  # a long case's sampled rows, keys streamed (forward only)
            return feature_rows(elu_features, q, k, v, rows, causal=True, offset=0, eps=eps, chunk=stream)
        fq, fk, vv = elu_features(q, k, v)
        return reference_form(fq, fk, vv, causal=True, offset=0, eps=eps)

    return Prepared(fn=fn, reference=reference, softmax_comparable=False, chunk=chunk)
