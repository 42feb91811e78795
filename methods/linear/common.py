"""Shared pieces of the linear-time family: the kernelised linear-attention skeleton in three forms, the
mask rule, hyper-parameter validation and the recurrent decode state.

The skeleton (methods-spec §12): with feature maps ``fq = φ_q(q)`` ``[B, H, Sq, m]`` and ``fk = φ_k(k)``
``[B, H, Skv, m]``,

    out_i = fq_i · S_i / (fq_i · z_i + eps),   S_i = Σ_{j ∈ C_i} fk_j v_jᵀ,   z_i = Σ_{j ∈ C_i} fk_j

with ``C_i`` every key (full mask) or the keys ``j <= i + offset`` (causal, bottom-right ``offset =
seq_kv - seq_q``, or the mask's own offset). ``normalize=False`` drops the denominator.

Forms: :func:`naive_linear` (the quadratic masked form, readable, any dtype: the reference),
:func:`chunked_linear` (intra-chunk quadratic + inter-chunk prefix states by ``cumsum``; states in fp32),
and :class:`LinearState` (the recurrent state ``(S, z)`` for decode: O(m · dv) per head, whatever the
context). The references' ``rows=`` form (:func:`streamed_rows`, :func:`feature_rows`: a few query rows,
keys streamed in chunks with the prefix state carried, optionally gated) is what the case runner gates a long
case on. Features are computed by the methods; this module never draws random numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..contract import RecurrentDecode
from ..registry import Unsupported

# masks the kernelised family runs: full (noncausal, also cross) and causal-aligned (causal, decode)
LINEAR_MASKS = frozenset({"full", "causal", "decode"})
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- hyper-parameters -------------------------------------------------------------------------------------
def param_int(ctx, name: str, default: int, minimum: int = 1, maximum: int | None = None, power_of_two=False):
    """An integer hyper-parameter from ``method_options.<method>.<name>``, validated (ValueError naming it)."""
    value = ctx.param(name, default)
    field = f"method_options.{ctx.case.method}.{name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{field}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{field}: must be <= {maximum}, got {value}")
    if power_of_two and value & (value - 1):
        raise ValueError(f"{field}: must be a power of two, got {value}")
    return value


def param_float(ctx, name: str, default: float, minimum: float | None = None, maximum: float | None = None,
                strict_min: bool = False):
    value = ctx.param(name, default)
    field = f"method_options.{ctx.case.method}.{name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field}: must be a finite number, got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        raise ValueError(f"{field}: must be {'>' if strict_min else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{field}: must be <= {maximum}, got {value}")
    return value


def param_choice(ctx, name: str, default: str, choices):
    value = ctx.param(name, default)
    if isinstance(value, bool) or value not in choices:  # True == 1: a bool is never a valid choice here
        raise ValueError(f"method_options.{ctx.case.method}.{name}: must be one of {sorted(choices, key=str)}, "
                         f"got {value!r}")
    return value


def compute_dtype(ctx, default: str = "float32") -> torch.dtype:
    """``method_options.<m>.compute_dtype``: the dtype the chunked form computes in (states stay fp32)."""
    return COMPUTE_DTYPES[param_choice(ctx, "compute_dtype", default, COMPUTE_DTYPES)]


def mask_mode(ctx) -> tuple[bool, int]:
    """(causal, offset) for the case's mask; Unsupported for masks the family cannot express."""
    mask = ctx.mask
    if mask.full:
        return False, 0
    if mask.name in ("causal", "decode"):
        return True, int(mask.offset)
    raise Unsupported(f"{ctx.case.method} runs full and causal masks only, not {mask.label}")


def expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """GQA: repeat kv heads to the query heads (head h uses kv head h // group)."""
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


# ---- the three forms --------------------------------------------------------------------------------------
def causal_visible(seq_q: int, seq_kv: int, offset: int, device) -> torch.Tensor:
    """bool [seq_q, seq_kv]: key j visible from query i when j <= i + offset."""
    rows = torch.arange(seq_q, device=device)[:, None]
    cols = torch.arange(seq_kv, device=device)[None, :]
    return cols <= rows + offset


def _den(den, eps, floor):
    return (den if floor is None else den.clamp_min(floor)) + eps


def naive_linear(fq, fk, v, *, causal: bool, offset: int, eps: float, normalize: bool = True, weights=None,
                 floor=None):
    """Quadratic masked form, in the dtype of its inputs: ``A = fq fkᵀ`` (times ``weights`` [Sq, Skv] if
    given), masked, ``out = A v / (A 1 + eps)`` (the sum clamped at ``floor`` first when given)."""
    scores = fq @ fk.transpose(-1, -2)
    if weights is not None:
        scores = scores * weights
    if causal:
        scores = scores.masked_fill(~causal_visible(fq.shape[2], fk.shape[2], offset, fq.device), 0.0)
    out = scores @ v
    if normalize:
        out = out / _den(scores.sum(-1, keepdim=True), eps, floor)
    return out


def _pad_to(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def chunked_linear(fq, fk, v, *, causal: bool, offset: int, eps: float, chunk: int, normalize: bool = True,
                   dtype: torch.dtype = torch.float32, state0=None, floor=None):
    """The chunked parallel form. Matmuls in ``dtype``; the prefix states and the normaliser in fp32.

    Causal: queries are aligned to keys ``offset ..`` (keys before that form an initial state; queries with
    ``i + offset < 0`` see nothing and give 0). ``state0``: an extra initial ``(S [B,H,m,dv], z [B,H,m])``.
    Returns ``[B, H, Sq, dv]`` in ``v``'s dtype.
    """
    out_dtype = v.dtype
    fq, fk, v = fq.to(dtype), fk.to(dtype), v.to(dtype)
    if not causal:
        kv = (fk.transpose(-1, -2) @ v).float()
        num = (fq @ kv.to(dtype)).float()
        if state0 is not None:
            num = num + fq.float() @ state0[0]
        if not normalize:
            return num.to(out_dtype)
        z = fk.float().sum(2)
        if state0 is not None:
            z = z + state0[1]
        den = (fq.float() * z[:, :, None, :]).sum(-1, keepdim=True)
        return (num / _den(den, eps, floor)).to(out_dtype)
    batch, heads, seq_q, m = fq.shape
    seq_kv, dv = fk.shape[2], v.shape[-1]
    out = fq.new_zeros(batch, heads, seq_q, dv, dtype=torch.float32)
    s0 = None if state0 is None else state0[0].float()
    z0 = None if state0 is None else state0[1].float()
    if offset > 0:  # keys before the first query's position: an initial state
        pre_s = (fk[:, :, :offset].transpose(-1, -2) @ v[:, :, :offset]).float()
        pre_z = fk[:, :, :offset].float().sum(2)
        s0 = pre_s if s0 is None else s0 + pre_s
        z0 = pre_z if z0 is None else z0 + pre_z
        fk, v = fk[:, :, offset:], v[:, :, offset:]
        first = 0
    else:
        first = -offset  # queries 0 .. -offset-1 see no key
        fq = fq[:, :, first:]
    n = fq.shape[2]
    if n <= 0:
        return out.to(out_dtype)
    fk, v = fk[:, :, :n], v[:, :, :n]
    chunks = -(-n // chunk)
    length = chunks * chunk
    qc = _pad_to(fq, length).view(batch, heads, chunks, chunk, m)
    kc = _pad_to(fk, length).view(batch, heads, chunks, chunk, m)
    vc = _pad_to(v, length).view(batch, heads, chunks, chunk, dv)
    kv = (kc.transpose(-1, -2) @ vc).float()  # [B, H, N, m, dv]
    states = torch.cumsum(kv, dim=2).sub_(kv)  # exclusive prefix: the state entering each chunk
    del kv  # one [N, m, dv] tensor alive, not three (16 GiB each for cosFormer at 1M, 16 heads); not saved for backward
    if s0 is not None:
        states = states + s0[:, :, None]
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~tri, 0.0)
    num = (qc @ states.to(dtype)).float() + (scores @ vc).float()
    if normalize:
        zk = kc.float().sum(3)  # [B, H, N, m]
        zs = torch.cumsum(zk, dim=2) - zk
        if z0 is not None:
            zs = zs + z0[:, :, None]
        den = (qc.float() * zs[:, :, :, None, :]).sum(-1, keepdim=True) + scores.float().sum(-1, keepdim=True)
        num = num / _den(den, eps, floor)
    result = num.reshape(batch, heads, length, dv)[:, :, :n]
    if first:
        result = torch.cat([out[:, :, :first], result], dim=2)
    return result.to(out_dtype)


def linear_reference(naive_max_pairs: int, chunk: int):
    """Choose the reference form by size: the quadratic :func:`naive_linear` up to ``naive_max_pairs``
    (query, key) pairs per head, else :func:`chunked_linear` in fp32 with half the chunk (a different
    chunking, and less memory than the fast path: the CPU tests tie the chunked form to the naive one; at 1M
    tokens the quadratic form does not fit)."""

    def attend(fq, fk, v, *, causal, offset, eps, normalize=True, floor=None):
        if fq.shape[2] * fk.shape[2] <= naive_max_pairs:
            return naive_linear(fq, fk, v, causal=causal, offset=offset, eps=eps, normalize=normalize, floor=floor)
        return chunked_linear(fq, fk, v, causal=causal, offset=offset, eps=eps, chunk=max(1, chunk // 2),
                              normalize=normalize, dtype=torch.float32, floor=floor)

    return attend


# ---- the sampled-rows reference (long cases) ---------------------------------------------------------------
STREAM_CHUNK = 8192  # keys per step of the streamed rows reference (``reference_stream_chunk``)


def streamed_rows(fq, key_chunk, seq_kv: int, last, *, chunk: int = STREAM_CHUNK, eps: float = 0.0,
                  normalize: bool = True, floor=None, carry: bool = True, decay_state: bool = True):
    """The causal (optionally gated) linear-attention skeleton on a few query rows, streaming over the keys:
    the ``rows=`` form of the family's references for long cases (the case runner gates a strided sample of
    query rows above ``ref_full_pairs``; at 1M tokens the full fp32 reference does not fit).

    ``fq`` [B, H, r, m]: the sampled rows' features. ``last`` [r] (long): the last key each row sees (row r
    sees keys ``0 .. last_r``; below 0: none, output 0; above ``seq_kv - 1``: all; a full mask is every row at
    ``seq_kv - 1``). ``key_chunk(start, stop) -> (fk [B, H, n, m], v [B, H, n, dv], g [B, H, n] or None)``
    gives the keys ``start .. stop-1`` (features at their absolute positions) and, for a gated form, their
    log-decays: the state then decays by ``exp(g_t)`` at every token, so a row ``i`` weighs key ``j`` by
    ``exp(Σ_{j<s<=i} g_s)``.

    Keys are walked in chunks of ``chunk`` in fp32, carrying the prefix state ``S = Σ fk vᵀ`` [B, H, m, dv] and
    ``z = Σ fk`` [B, H, m] (decayed to the chunk's end when gated); a row is finished in the chunk holding
    its last key: ``fq · S`` (times ``exp(Σ g)`` from the chunk's start to the row, when gated) plus the
    masked intra-chunk part ``(fq fkᵀ ⊙ decay)_{j<=i} v``, and, normalised, divided by the same sums with
    ``v = 1`` plus ``eps`` (clamped at ``floor`` first, as :func:`chunked_linear`). Log-decays are summed
    backwards from each row (reverse cumulative sums inside the chunk), so the exponents near a row are sums
    of few terms, never differences of two long prefix sums. Extra memory O(r · chunk + chunk · (m + dv) +
    m · dv) per (batch, head), whatever ``seq_kv``. Returns ``[B, H, r, dv]`` in fp32. ``carry=False`` (each
    chunk starts from a zero state) and ``decay_state=False`` (the carried state not decayed across a chunk)
    are deliberately broken variants for the tests' negative controls.

    Not for the delta rules: their state update ``S ← α(I − β k kᵀ)S + β k vᵀ`` is not a sum of per-key
    terms; their rows form (``gated_delta.delta_rows``) runs every token through the state instead."""
    if chunk < 1:
        raise ValueError(f"streamed_rows: chunk must be >= 1, got {chunk}")
    batch, heads, count, _ = fq.shape
    fq = fq.float()
    last = last.to(fq.device).long().clamp(max=seq_kv - 1)
    num = den = S = z = None
    for start in range(0, seq_kv, chunk):
        stop = min(start + chunk, seq_kv)
        fk, vv, g = key_chunk(start, stop)
        fk, vv = fk.float(), vv.float()
        g = None if g is None else g.float()
        if num is None:
            num = fq.new_zeros(batch, heads, count, vv.shape[-1])
            den = fq.new_zeros(batch, heads, count, 1)
        here = ((last >= start) & (last < stop)).nonzero().squeeze(1)  # rows finished in this chunk
        if here.numel():
            a = fq[:, :, here]
            visible = torch.arange(stop - start, device=fq.device)[None, :] <= (last[here] - start)[:, None]
            scores = a @ fk.transpose(-1, -2)  # [B, H, r, n]
            into = None  # the state's weight at each row: exp(Σ g from the chunk's start to the row)
            if g is None:
                scores = scores.masked_fill(~visible, 0.0)
            else:
                logs = g[:, :, None, :].masked_fill(~visible, 0.0)  # g_s for s <= the row, per row
                upto = logs.flip(-1).cumsum(-1).flip(-1)  # Σ_{j<=s<=row} g_s
                after = torch.cat([upto[..., 1:], torch.zeros_like(upto[..., :1])], dim=-1)  # Σ_{j<s<=row}
                scores = scores * torch.exp(after).masked_fill(~visible, 0.0)
                into = torch.exp(upto[..., :1])  # [B, H, r, 1]
            part = scores @ vv
            if S is not None:
                part = part + (a @ S if into is None else into * (a @ S))
            num[:, :, here] = part
            if normalize:
                total = scores.sum(-1, keepdim=True)
                if z is not None:
                    prior = a @ z[..., None]
                    total = total + (prior if into is None else into * prior)
                den[:, :, here] = total
        if stop < seq_kv:  # carry the state to the end of this chunk
            if g is not None:
                tail = g.flip(-1).cumsum(-1).flip(-1)  # Σ_{j<=s<end} g_s
                weight = torch.exp(torch.cat([tail[..., 1:], torch.zeros_like(tail[..., :1])], dim=-1))
                fk = fk * weight[..., None]  # decayed to the chunk's last token
                whole = torch.exp(tail[..., 0])  # [B, H]: the decay across the chunk
                if S is not None and decay_state:
                    S, z = S * whole[..., None, None], z * whole[..., None]
            add_s, add_z = fk.transpose(-1, -2) @ vv, fk.sum(2)
            S, z = (add_s, add_z) if S is None or not carry else (S + add_s, z + add_z)
    if normalize:  # rows that see no key stay 0 (as chunked_linear's)
        seen = (last >= 0)[:, None]
        num = torch.where(seen, num / _den(den, eps, floor), num)
    return num


def feature_rows(features, q, k, v, rows, *, causal: bool, offset: int, eps: float, normalize: bool = True,
                 floor=None, chunk: int = STREAM_CHUNK, **kw):
    """The kernelised skeleton's output on query rows ``rows`` only ([B, H, len(rows), dv], ``v``'s dtype),
    by :func:`streamed_rows`: ``features(q, k, v, q_pos, k_pos, **kw)`` is called on the sampled query rows
    (at their absolute positions ``row + offset``) and on each key chunk (positions ``start .. stop-1``), so
    position-dependent maps (cosFormer) see the right positions. Feature maps must act row by row (every
    map of the family does: elu+1, random features with a per-row shift, position reweighting)."""
    rows = rows.to(q.device).long()
    qpos = rows + offset
    none = torch.zeros(0, dtype=torch.long, device=q.device)
    fq, _, _ = features(q[:, :, rows], k[:, :, :0], v[:, :, :0], qpos, none, **kw)
    seq_kv = k.shape[2]
    last = qpos if causal else torch.full_like(rows, seq_kv - 1)

    def key_chunk(start, stop):
        kpos = torch.arange(start, stop, device=k.device)
        _, fk, vv = features(q[:, :, :0], k[:, :, start:stop], v[:, :, start:stop], none, kpos, **kw)
        return fk, vv, None

    out = streamed_rows(fq, key_chunk, seq_kv, last, chunk=chunk, eps=eps, normalize=normalize, floor=floor)
    return out.to(v.dtype)


# ---- recurrent decode -------------------------------------------------------------------------------------
@dataclass
class LinearState:
    """``S`` [B, H, m, dv] and ``z`` [B, H, m], fp32: the whole past, whatever its length."""

    S: torch.Tensor
    z: torch.Tensor


def linear_decode(features, eps: float, normalize: bool = True, floor=None) -> RecurrentDecode:
    """A RecurrentDecode from ``features(q, k, v, q_pos, k_pos, **kw) -> (fq, fk, v)`` (positions are the
    absolute key positions of the tokens given, for position-dependent maps such as cosFormer's)."""

    def prefill(q, k, v, **kw):
        past = k.shape[2] - 1
        kpos = torch.arange(past, device=k.device)
        qpos = torch.arange(q.shape[2], device=q.device) + (k.shape[2] - q.shape[2])
        _, fk, vv = features(q, k[:, :, :past], v[:, :, :past], qpos, kpos, **kw)
        S = (fk.float().transpose(-1, -2) @ vv.float())
        return LinearState(S=S, z=fk.float().sum(2))

    def step(state: LinearState, q, k, v, **kw):
        last = k.shape[2] - 1
        pos = torch.arange(last, last + 1, device=k.device)  # on the device: torch.tensor([last]) copied from the host each step
        fq, fk, vv = features(q[:, :, -1:], k[:, :, last:], v[:, :, last:], pos, pos, **kw)
        fq, fk, vv = fq.float(), fk.float(), vv.float()
        S = state.S + fk.transpose(-1, -2) @ vv
        num = fq @ S
        if normalize:
            z = state.z + fk[:, :, 0]
            num = num / _den((fq * z[:, :, None, :]).sum(-1, keepdim=True), eps, floor)
        return num.to(v.dtype)

    return RecurrentDecode(prefill=prefill, step=step,
                           state_bytes=lambda s: (s.S[0].numel() + s.z[0].numel()) * s.S.element_size())


# ---- impl: triton (the kernelised methods through the own Triton scan) -------------------------------------
IMPLS = ("chunked", "triton")
TRITON_ONLY = ("block_v", "seg_chunks", "num_warps", "feature_dtype")  # options of impl: triton alone
TRITON_MAX_WIDTH = 256  # linear_triton.MAX_WIDTH (not imported here: importing it imports triton)


def kernel_impl(ctx) -> str:
    """``method_options.<m>.impl``: ``chunked`` (default) or ``triton``, validated with the options that
    belong to one impl only (ValueError naming the field)."""
    impl = ctx.param("impl", "chunked")
    field = f"method_options.{ctx.case.method}"
    if impl not in IMPLS:
        raise ValueError(f"{field}.impl: must be 'chunked' or 'triton', got {impl!r}")
    if impl == "chunked":
        for name in TRITON_ONLY:
            if name in ctx.params:
                raise ValueError(f"{field}.{name}: applies to impl 'triton' only (impl is 'chunked')")
    elif "compute_dtype" in ctx.params:
        raise ValueError(f"{field}.compute_dtype: applies to impl 'chunked' only (impl 'triton' computes in "
                         f"the inputs' dtype)")
    return impl


def triton_options(ctx) -> dict:
    """The Triton scan's options, validated: ``chunk`` (16..256, power of two, default 64), ``block_v``
    (default 64), ``seg_chunks`` (default 4), ``num_warps`` (default 4)."""
    return dict(chunk=param_int(ctx, "chunk", 64, minimum=16, maximum=256, power_of_two=True),
                block_v=param_int(ctx, "block_v", 64, minimum=16, maximum=256, power_of_two=True),
                seg_chunks=param_int(ctx, "seg_chunks", 4, minimum=1, maximum=1024),
                num_warps=param_choice(ctx, "num_warps", 4, (1, 2, 4, 8, 16)))


FEATURE_DTYPES = ("input", "float32")


def triton_feature_dtype(ctx) -> str:
    """``feature_dtype`` of ``impl: triton``: ``input`` (the default: features, values and the scan in the
    inputs' dtype) or ``float32`` (features, values and the scan in fp32, the output cast back). bf16 features
    carry up to 2^-8 (~0.4 %) relative rounding into Σ φq·φk; where that sum is small against the features
    (rfa's rows at or near its denominator floor) the quotient's error grows by the same factor: on the CPU (Triton's interpreter),
    rfa at sigma 0.5 misses the bf16 gate in dq / dk with bf16 features, while its chunked form (fp32
    features) passes; ``float32`` is the fix at the cost of fp32 scans."""
    value = ctx.param("feature_dtype", "input")
    if value not in FEATURE_DTYPES:
        raise ValueError(f"method_options.{ctx.case.method}.feature_dtype: must be one of {FEATURE_DTYPES}, "
                         f"got {value!r}")
    return value


def triton_supported(ctx, *, causal: bool, offset: int, normalize: bool, feature_width):
    """Raise ``Unsupported`` (the case's row: ``unsupported`` with this reason) for what ``impl: triton``
    cannot run; None when it can."""
    import importlib.util

    case = ctx.case
    name = f"{case.method} with method_options.{case.method}.impl=triton"
    if not normalize:
        raise Unsupported(f"{name}: the Triton scan runs the normalised form only")
    if getattr(case, "mode", None) == "decode":
        raise Unsupported(f"{name}: no decode step of its own (the recurrent step is impl 'chunked''s)")
    if not causal or offset != 0 or case.seq_q != case.seq_kv:
        raise Unsupported(f"{name}: the Triton scan runs causal self-attention only, not {ctx.mask.label} "
                          f"with seq_q {case.seq_q}, seq_kv {case.seq_kv}")
    if feature_width is None:
        raise Unsupported(f"{name}: the method does not declare its feature width")
    widths = {"feature width m": feature_width, "value head dim": ctx.head_dim_v}
    for what, width in widths.items():
        if width > TRITON_MAX_WIDTH:
            raise Unsupported(f"{name}: {what} {width} above the Triton scan's {TRITON_MAX_WIDTH}")
    if importlib.util.find_spec("triton") is None:
        raise Unsupported(f"{name}: needs module 'triton', not importable here")
    from .linear_attn import triton_runnable

    why = triton_runnable(ctx.device)
    if why:
        raise Unsupported(f"{name}: {why}")


# ---- a builder for feature-map methods ----------------------------------------------------------------------
def kernelized(ctx, features, *, softmax_comparable: bool, normalize: bool = True, prepare=None, extras=None,
               parameters=(), default_chunk: int = 128, eps_default: float = 1e-6, floor=None,
               feature_width: int | None = None):
    """``Prepared`` for a method given by its feature maps.

    ``features(q, k, v, q_pos, k_pos, **kw) -> (fq, fk, v)`` with GQA expanded; ``q_pos``/``k_pos`` are
    absolute positions (keys 0..Skv-1, query i at i + offset), used by position-dependent maps (cosFormer). Hyper-parameters read here:
    ``chunk`` (chunk length of the parallel form), ``eps`` (denominator), ``compute_dtype`` (matmul dtype of
    the chunked form), ``reference_naive_max_pairs`` (above, the reference is the chunked form in fp32),
    ``reference_stream_chunk`` (keys per step of the reference's ``rows=`` form, :func:`feature_rows`, which
    the case runner uses on long cases).

    ``impl`` (``method_options.<m>.impl``): ``chunked`` (the default: :func:`chunked_linear` in PyTorch) or
    ``triton``: the same feature maps (PyTorch, autograd through them), then the causal normalised scan over
    them by the own Triton kernel (``linear_triton.linear_attn(feature_map="identity")``, forward and backward)
    in the inputs' dtype. ``triton`` takes causal self-attention with ``normalize`` (``floor`` too: the kernel
    clamps its denominator as :func:`_den` and the backward follows), feature and
    value widths up to 256 (``feature_width``: m, given by the method), on CUDA or under
    ``TRITON_INTERPRET=1``; anything else is ``Unsupported`` before any work (:func:`triton_supported`), and
    it has no decode step or state scan (those would be the PyTorch forms). Its own options (:func:`triton_options`):
    ``chunk`` (power of two in 16..256, default 64), ``block_v``, ``seg_chunks``, ``num_warps``, as
    ``linear_attn_triton``'s, and ``feature_dtype`` (:func:`triton_feature_dtype`); ``compute_dtype`` is the
    chunked form's only.
    """
    from ..contract import Prepared

    impl = kernel_impl(ctx)
    causal, offset = mask_mode(ctx)
    if impl == "triton":
        kernel_opts = triton_options(ctx)
        chunk = kernel_opts["chunk"]
        wide_features = triton_feature_dtype(ctx) == "float32"
    else:
        chunk = param_int(ctx, "chunk", default_chunk, minimum=1, maximum=4096)
    eps = param_float(ctx, "eps", eps_default, minimum=0.0)
    dtype = compute_dtype(ctx) if impl == "chunked" else None
    naive_max = param_int(ctx, "reference_naive_max_pairs", 1 << 26)
    stream = param_int(ctx, "reference_stream_chunk", STREAM_CHUNK)
    reference_form = linear_reference(naive_max, chunk)
    if impl == "triton":  # every refusal before any work: no silent fallback to the chunked form
        triton_supported(ctx, causal=causal, offset=offset, normalize=normalize, feature_width=feature_width)
        from .linear_triton import linear_attn as scan_kernel

    def positions(q, k):  # absolute positions: keys 0..Skv-1, query i at i + offset (0 for the full mask)
        return torch.arange(q.shape[2], device=q.device) + offset, torch.arange(k.shape[2], device=k.device)

    def fn(q, k, v, **kw):
        qpos, kpos = positions(q, k)
        fq, fk, vv = features(q, k, v, qpos, kpos, **kw)
        if impl == "triton":  # the features as they are, in the inputs' dtype (or fp32), through the Triton scan
            if wide_features:
                out = scan_kernel(fq.float(), fk.float(), vv.float(), eps=eps, feature_map="identity", floor=floor,
                                  **kernel_opts)
                return out.to(vv.dtype)
            fq, fk = fq.to(vv.dtype), fk.to(vv.dtype)  # rebound: wider copies are freed before the scan
            return scan_kernel(fq, fk, vv, eps=eps, feature_map="identity", floor=floor, **kernel_opts)
        return chunked_linear(fq, fk, vv, causal=causal, offset=offset, eps=eps, chunk=chunk,
                              normalize=normalize, dtype=dtype, floor=floor)

    def reference(q, k, v, rows=None, **kw):
        if rows is not None:  # a long case's sampled rows, streamed (forward only)
            return feature_rows(features, q, k, v, rows, causal=causal, offset=offset, eps=eps,
                                normalize=normalize, floor=floor, chunk=stream, **kw)
        qpos, kpos = positions(q, k)
        fq, fk, vv = features(q, k, v, qpos, kpos, **kw)
        return reference_form(fq, fk, vv, causal=causal, offset=offset, eps=eps, normalize=normalize, floor=floor)

    # impl: triton has no decode step or state scan of its own: the recurrent step and the CP state scan are
    # the PyTorch forms (decode cases are refused above; CP layouts find no state scan)
    decode = linear_decode(features, eps, normalize, floor) if causal and impl == "chunked" else None
    scan = linear_state_scan(features, causal=causal, eps=eps, chunk=chunk, normalize=normalize, dtype=dtype,
                             floor=floor) if offset == 0 and impl == "chunked" else None
    return Prepared(fn=fn, reference=reference, prepare=prepare, extras=dict(extras or {}),
                    parameters=tuple(parameters), decode=decode, softmax_comparable=softmax_comparable,
                    state_scan=scan, chunk=chunk)


def linear_state_scan(features, *, causal: bool, eps: float, chunk: int, normalize: bool, dtype, floor=None):
    """The kernelised skeleton as a :class:`StateScan` (self-attention, queries at the keys' positions): a
    piece's summary is its fp32 state ``(Σ φ(k) vᵀ, Σ φ(k))``, summaries add, and a piece finishes with the
    chunked form started from the incoming state."""
    from ..contract import StateScan

    def summary(q, k, v, positions, **kw):
        _, fk, vv = features(q, k, v, positions, positions, **kw)
        return (fk.float().transpose(-1, -2) @ vv.float(), fk.float().sum(2))

    def combine(earlier, later):
        return tuple(a + b for a, b in zip(earlier, later))

    def finish(q, k, v, positions, incoming, **kw):
        fq, fk, vv = features(q, k, v, positions, positions, **kw)
        return chunked_linear(fq, fk, vv, causal=causal, offset=0, eps=eps, chunk=chunk, normalize=normalize,
                              dtype=dtype, state0=incoming, floor=floor)

    return StateScan(summary=summary, combine=combine, finish=finish)


KERNELIZED_CAPS = dict(family="linear", exact=False, masks=LINEAR_MASKS, cross=True, gqa=True, backward=True,
                       decode=True)
# the method_options every kernelised method (``kernelized``) reads, on one impl or the other
KERNELIZED_OPTIONS = ("impl", "chunk", "eps", "compute_dtype", "reference_naive_max_pairs", "reference_stream_chunk",
                      "block_v", "seg_chunks", "num_warps", "feature_dtype")
