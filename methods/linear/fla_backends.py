"""flash-linear-attention (``fla-core``) kernels as backends: the production baseline of the linear family.

Registered like SDPA's backends, one method per operator, each with ``requires=("fla", "triton", "einops")`` (listed
as unavailable where fla does not import) and CUDA only (fla's Triton kernels need a GPU driver; they do not
run under ``TRITON_INTERPRET`` on the CPU). Each computes the *same operator* as an own method and is gated
against that method's reference:

- ``fla_linear_attn``: ``chunk_linear_attn(elu(q)+1, elu(k)+1, v, scale=1, normalize=True)`` (the feature
  map applied in the timed call) = ``linear_attn`` (fla's ε is 1e-10, ours 1e-6: far below the gate);
- ``fla_simple_gla``: ``chunk_simple_gla(q, k, v, g)`` = ``simple_gla``;
- ``fla_delta_rule``: ``chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True)`` = ``delta_rule``;
- ``fla_gated_delta_rule``: ``chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)`` =
  ``gated_delta_rule``.

Every adapter's reference takes ``rows=`` (the own method's rows form, rows in fla's layout
``[B, len(rows), H, D]``), which the case runner gates long cases on.

Inputs in fla's ``[B, T, H, D]`` layout (``input_layout="bshd"``; gates ``[B, T, H]``), causal self-attention
only, no decode rows (the own methods' recurrent steps serve decode). fla refuses its gated backward on Hopper
with Triton >= 3.4, < 3.7.1 ("... produces incorrect results for gated ..."): that error is declared a
decline, so those rows are ``unsupported`` with fla's own message as the reason. The gated adapters
(fla_simple_gla, fla_gated_delta_rule) also check fla's own condition before any work (:func:`gated_refusal`:
fla's flags ``IS_NVIDIA_HOPPER``, ``TRITON_ABOVE_3_4_0``, ``TRITON_ABOVE_3_7_1``, and no ``tilelang`` to
dispatch to): a case that needs the backward is then ``unsupported`` at build, with the same message, instead
of after fla's Triton autotuning of the forward (60-110 s a first call on the H200, in every training case of
the task grid).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contract import Extra, Prepared
from ..registry import Capabilities, Unsupported, register_method
from . import gated_delta
from .common import STREAM_CHUNK, mask_mode, naive_linear, param_int
from .linear_attn import elu_features

DECLINES = ("produces incorrect results", "Triton is not supported")
CAPS = dict(family="linear", exact=False, masks={"causal"}, causal_only=True, backward=True, devices=("cuda",),
            dtypes=("float16", "bfloat16"),
            requires=("fla", "triton", "einops"), input_layout="bshd", declines=DECLINES, prefix_closed=True)
FLA_CHUNK = 64  # the chunk of fla's chunk_* kernels: a long case's gradient prefix is a multiple of it


GATED_REFUSAL = ("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results for gated "
                 "chunk_bwd_dqkwg (see #640). Please upgrade Triton to >= 3.7.1 or install tilelang: "
                 "`pip install tilelang`")


def gated_refusal(device) -> str | None:
    """fla's refusal of its gated backward (``chunk_bwd_dqkwg`` with a gate, fla.ops.common.chunk_o), decided
    by fla's own flags for this process, or None where fla would run it (another GPU or Triton, tilelang
    installed, or an fla without those flags: then its runtime error is still the decline)."""
    import importlib.util

    if torch.device(device).type != "cuda" or importlib.util.find_spec("tilelang") is not None:
        return None
    try:
        from fla.ops.common import chunk_o
    except ImportError:
        return None
    flags = [getattr(chunk_o, name, None) for name in ("IS_NVIDIA_HOPPER", "TRITON_ABOVE_3_4_0", "TRITON_ABOVE_3_7_1")]
    if any(flag is None for flag in flags):
        return None
    hopper, above_3_4, above_3_7_1 = flags
    return GATED_REFUSAL if (hopper and above_3_4 and not above_3_7_1) else None


def _refuse_gated_backward(ctx):
    if getattr(ctx.case, "mode", None) in ("fwd_bwd", "bwd"):
        why = gated_refusal(ctx.device)
        if why:
            raise Unsupported(why)


def _bhsd(t):
    return t.transpose(1, 2)


def _causal_self(ctx):
    causal, offset = mask_mode(ctx)
    if not causal or offset != 0 or ctx.case.seq_q != ctx.case.seq_kv:
        raise Unsupported(f"{ctx.case.method}: fla's chunk kernels run causal self-attention only")


@register_method("fla_linear_attn", Capabilities(**CAPS),
                 options=("reference_naive_max_pairs", "reference_stream_chunk"))
def build_fla_linear_attn(ctx):
    """fla chunk_linear_attn on elu+1 features (normalised): the same operator as linear_attn."""
    _causal_self(ctx)
    from fla.ops.linear_attn import chunk_linear_attn

    eps = 1e-6
    naive_max = param_int(ctx, "reference_naive_max_pairs", 1 << 26)
    stream = param_int(ctx, "reference_stream_chunk", STREAM_CHUNK)

    def fn(q, k, v):
        fq, fk = F.elu(q) + 1.0, F.elu(k) + 1.0
        out, _ = chunk_linear_attn(fq, fk, v, scale=1.0, normalize=True)
        return out

    def reference(q, k, v, rows=None):
        from .common import feature_rows, linear_reference

        if rows is not None:  # a long case's sampled rows, keys streamed; [B, len(rows), H, D]
            return _bhsd(feature_rows(elu_features, _bhsd(q), _bhsd(k), _bhsd(v), rows, causal=True, offset=0,
                                      eps=eps, chunk=stream))
        fq, fk, vv = elu_features(_bhsd(q), _bhsd(k), _bhsd(v))
        out = linear_reference(naive_max, 128)(fq, fk, vv, causal=True, offset=0, eps=eps)  # chunk 64 above
        return _bhsd(out)

    return Prepared(fn=fn, reference=reference, softmax_comparable=False, chunk=FLA_CHUNK)


def _gate_extras(case, gated: bool, delta: bool) -> dict:
    shape = (case.batch, case.seq_kv, case.heads_q)
    extras = {}
    if gated:
        extras["g"] = Extra(shape=shape, init="logsigmoid", dtype="float32")
    if delta:
        extras["beta"] = Extra(shape=shape, init="uniform", dtype="float32")
    return extras


def _fla_variant(ctx, name: str, call):
    _causal_self(ctx)
    gated, delta, normalize = gated_delta.VARIANTS[name]
    naive_max = param_int(ctx, "reference_naive_max_len", 4096, minimum=1)
    stream = param_int(ctx, "reference_stream_chunk", STREAM_CHUNK)
    kw = dict(gated=gated, delta=delta, normalize=normalize)

    def reference(q, k, v, g=None, beta=None):
        q, k, v = _bhsd(q), _bhsd(k), _bhsd(v)
        g = None if g is None else g.transpose(1, 2)
        beta = None if beta is None else beta.transpose(1, 2)
        if k.shape[2] <= naive_max:
            out = gated_delta.naive_recurrence(q, k, v, g, beta, **kw)
        else:
            out = gated_delta.chunked(q, k, v, g, beta, chunk=32, segment=gated_delta.reference_segment(k.shape[2]),
                                      **kw)
        return _bhsd(out)

    full_reference = reference

    def reference(q, k, v, g=None, beta=None, rows=None):  # rows=: a long case's sampled rows, [B, len(rows), H, D]
        if rows is None:
            return full_reference(q, k, v, g, beta)
        g = None if g is None else g.transpose(1, 2)
        if not delta:  # fla_simple_gla
            return _bhsd(gated_delta.gated_rows(_bhsd(q), _bhsd(k), _bhsd(v), g, rows, chunk=stream))
        beta = None if beta is None else beta.transpose(1, 2)
        return _bhsd(gated_delta.delta_rows(_bhsd(q), _bhsd(k), _bhsd(v), g, beta, rows, gated=gated, chunk=32,
                                            stream=stream))

    return Prepared(fn=call, reference=reference, extras=_gate_extras(ctx.case, gated, delta),
                    softmax_comparable=False, chunk=FLA_CHUNK)


@register_method("fla_simple_gla", Capabilities(**CAPS), options=("reference_naive_max_len", "reference_stream_chunk"))
def build_fla_simple_gla(ctx):
    """fla chunk_simple_gla (scalar-gated linear attention): the same operator as simple_gla."""
    _refuse_gated_backward(ctx)
    from fla.ops.simple_gla import chunk_simple_gla

    def fn(q, k, v, g):
        return chunk_simple_gla(q, k, v, g=g)[0]

    return _fla_variant(ctx, "simple_gla", fn)


@register_method("fla_delta_rule", Capabilities(**CAPS), options=("reference_naive_max_len", "reference_stream_chunk"))
def build_fla_delta_rule(ctx):
    """fla chunk_delta_rule with in-kernel q/k l2 norm: the same operator as delta_rule."""
    from fla.ops.delta_rule import chunk_delta_rule

    def fn(q, k, v, beta):
        return chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True)[0]

    return _fla_variant(ctx, "delta_rule", fn)


@register_method("fla_gated_delta_rule", Capabilities(**CAPS),
                 options=("reference_naive_max_len", "reference_stream_chunk"))
def build_fla_gated_delta_rule(ctx):
    """fla chunk_gated_delta_rule with in-kernel q/k l2 norm: the same operator as gated_delta_rule."""
    _refuse_gated_backward(ctx)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    def fn(q, k, v, g, beta):
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

    return _fla_variant(ctx, "gated_delta_rule", fn)
