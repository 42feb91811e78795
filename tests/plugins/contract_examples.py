"""Worked examples of the method contract v2 (``attnbench.methods.contract``), one small plugin per feature,
each beside a deliberately broken variant that the harness must catch. Loaded as a plugin by path;
tests/test_contract_examples.py runs them through the harness (``run_sweep``).

Names start with ``cx_``. Every method here computes in the dtype of its inputs, so the harness can run its
reference on fp32 copies.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from attnbench.methods import Capabilities, Extra, Prepared, RecurrentDecode, Unsupported, register_method


def _visible(ctx) -> torch.Tensor:
    """bool [seq_q, seq_kv] from the typed mask description: bottom-right causal or full."""
    m = ctx.mask
    rows = torch.arange(m.seq_q, device=ctx.device)[:, None]
    cols = torch.arange(m.seq_kv, device=ctx.device)[None, :]
    if m.causal:
        return cols <= rows + m.offset
    return torch.ones(m.seq_q, m.seq_kv, dtype=torch.bool, device=ctx.device)


def _softmax_attend(q, k, v, visible, bias=None, head_scale=None):
    """Readable masked softmax attention in the dtype of q; a row that sees no key gives 0."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if head_scale is not None:
        scores = scores * head_scale[None, :, None, None]
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf row: NaN -> 0
    return probs @ v


# ---- (b) untimed preparation: random features drawn in `prepare` -------------------------------------------------
def _positive_features(x, w):
    """exp(w·x' - |x'|²/2) / sqrt(m) with x' = x / d^(1/4): E[φ(q)·φ(k)] = exp(q·k / sqrt(d))."""
    x = x / x.shape[-1] ** 0.25
    return torch.exp(x @ w.to(x.dtype) - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[-1])


def _random_features(ctx, draw_in_fn: bool):
    features = ctx.param("features", 32)
    sleep_s = ctx.param("prepare_sleep_s", 0.0)
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"method_options.{ctx.case.method}.features: must be a positive integer, got {features!r}")
    causal = ctx.mask.causal

    def prepare(q, k, v):
        """Untimed: the feature draw (seeded from the case). The sleep stands for an expensive draw."""
        time.sleep(sleep_s)
        gen = torch.Generator(device=q.device).manual_seed(ctx.case.seed)
        return {"w": torch.randn(q.shape[-1], features, generator=gen, device=q.device)}

    def fast(q, k, v, w):
        """Linear form, O(seq): prefix sums of φ(k) vᵀ (causal) or one sum (full)."""
        fq, fk = _positive_features(q.float(), w), _positive_features(k.float(), w)
        vf = v.float()
        if causal:
            kv = torch.cumsum(fk.unsqueeze(-1) * vf.unsqueeze(-2), dim=2)  # [B, H, S, m, d]
            num = (fq.unsqueeze(-2) @ kv).squeeze(-2)
            den = (fq * fk.cumsum(2)).sum(-1, keepdim=True)
        else:
            num = fq @ (fk.transpose(-1, -2) @ vf)
            den = fq @ fk.sum(2).unsqueeze(-1)
        return (num / den).to(q.dtype)

    def reference(q, k, v, w):
        """Quadratic form: the same features, masked score matrix, row-normalised."""
        a = _positive_features(q, w) @ _positive_features(k, w).transpose(-1, -2)
        if causal:
            a = a.masked_fill(~torch.ones_like(a, dtype=torch.bool).tril(), 0.0)
        return (a @ v) / a.sum(-1, keepdim=True)

    if draw_in_fn:  # broken: the draw happens inside the timed call
        return Prepared(fn=lambda q, k, v: fast(q, k, v, **prepare(q, k, v)),
                        reference=lambda q, k, v: reference(q, k, v, **prepare(q, k, v)))
    return Prepared(fn=fast, reference=reference, prepare=prepare)


RF_CAPS = Capabilities(family="linear", exact=False, masks={"full", "causal"})


@register_method("cx_random_features", RF_CAPS)
def build_random_features(ctx):
    """Positive random features (Performer-like) drawn in the untimed `prepare`."""
    return _random_features(ctx, draw_in_fn=False)


@register_method("cx_random_features_in_fn", RF_CAPS)
def build_random_features_in_fn(ctx):
    """Broken placement: the same draw inside the timed call."""
    return _random_features(ctx, draw_in_fn=True)


# ---- (c) learnable parameters: a per-head temperature ----------------------------------------------------------
class _DoubleGradient(torch.autograd.Function):
    """Identity forward, twice the gradient backward: a bug that only a gradient check sees."""

    @staticmethod
    def forward(fctx, t):
        return t.clone()

    @staticmethod
    def backward(fctx, grad):
        return 2.0 * grad


def _temperature(ctx, variant: str):
    gen = torch.Generator(device="cpu").manual_seed(ctx.case.seed)
    tau = (1.0 + 0.1 * torch.randn(ctx.case.heads_q, generator=gen)).to(ctx.device).requires_grad_(True)
    visible = _visible(ctx)

    def fast(q, k, v):
        scale = _DoubleGradient.apply(tau) if variant == "bad_grad" else tau
        return _softmax_attend(q, k, v, visible, head_scale=scale.to(q.dtype))

    ref_tau = (tau.detach() * 1.05).requires_grad_(True) if variant == "other_params" else tau

    def reference(q, k, v):
        return _softmax_attend(q, k, v, visible, head_scale=ref_tau.float())  # the same leaf, cast inside

    return Prepared(fn=fast, reference=reference, parameters=[tau])


TEMP_CAPS = Capabilities(family="approx", exact=False, masks={"full", "causal"}, backward=True)


@register_method("cx_temperature", TEMP_CAPS)
def build_temperature(ctx):
    """Softmax attention with a learnable temperature per head (a parameter with gradients)."""
    return _temperature(ctx, "good")


@register_method("cx_temperature_other_params", TEMP_CAPS)
def build_temperature_other_params(ctx):
    """Broken: the reference uses other parameter values than the fast path."""
    return _temperature(ctx, "other_params")


@register_method("cx_temperature_bad_grad", TEMP_CAPS)
def build_temperature_bad_grad(ctx):
    """Broken: the temperature's gradient is doubled in the fast path (the output is right)."""
    return _temperature(ctx, "bad_grad")


# ---- (d) recurrent decode: causal linear attention with an O(d²) state ------------------------------------------
def _elu1(x):
    return F.elu(x) + 1.0


def _linear_causal_reference(q, k, v, offset: int):
    """Quadratic causal linear attention, bottom-right: query i sees keys j <= i + offset."""
    a = _elu1(q) @ _elu1(k).transpose(-1, -2)
    rows = torch.arange(q.shape[2], device=q.device)[:, None]
    cols = torch.arange(k.shape[2], device=q.device)[None, :]
    a = a.masked_fill(cols > rows + offset, 0.0)
    return (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-6)


def _linear_causal_fast(q, k, v, offset: int):
    """Prefix-sum form: the state after key j is S_j = Σ φ(k)vᵀ, z_j = Σ φ(k); query i reads S_{i+offset}."""
    fq, fk, vf = _elu1(q.float()), _elu1(k.float()), v.float()
    S = torch.cumsum(fk.unsqueeze(-1) * vf.unsqueeze(-2), dim=2)  # [B, H, Skv, d, d]
    z = torch.cumsum(fk, dim=2)
    index = torch.arange(q.shape[2], device=q.device) + offset
    seen = (index >= 0).to(fq.dtype)[None, None, :, None]
    index = index.clamp(0, k.shape[2] - 1)
    num = (fq.unsqueeze(-2) @ S[:, :, index]).squeeze(-2) * seen
    den = ((fq * z[:, :, index]).sum(-1, keepdim=True) * seen).clamp_min(1e-6)
    return (num / den).to(q.dtype)


def _linear_decode(reads_cache: bool) -> RecurrentDecode:
    def prefill(q, k, v):
        """Untimed: the state of the cache's first L - 1 tokens (fp32)."""
        fk = _elu1(k[:, :, :-1].float())
        return {"S": fk.transpose(-1, -2) @ v[:, :, :-1].float(), "z": fk.sum(2)}

    def step(state, q, k, v):
        """Timed: the newest token updates a copy of the state; its query reads it."""
        if reads_cache:  # broken: recomputes from the whole cache, ignoring the state
            fk, vf = _elu1(k.float()), v.float()
            S, z = fk.transpose(-1, -2) @ vf, fk.sum(2)
        else:
            fk, vf = _elu1(k[:, :, -1:].float()), v[:, :, -1:].float()
            S, z = state["S"] + fk.transpose(-1, -2) @ vf, state["z"] + fk[:, :, 0]
        fq = _elu1(q[:, :, -1:].float())
        out = (fq @ S) / (fq * z[:, :, None, :]).sum(-1, keepdim=True).clamp_min(1e-6)
        return out.to(q.dtype)

    return RecurrentDecode(prefill=prefill, step=step)


LINEAR_CAPS = Capabilities(family="linear", exact=False, masks={"causal"}, causal_only=True, cross=True,
                           decode=True)


def _linear(ctx, reads_cache: bool):
    offset = ctx.mask.offset
    return Prepared(fn=lambda q, k, v: _linear_causal_fast(q, k, v, offset),
                    reference=lambda q, k, v: _linear_causal_reference(q, k, v, offset),
                    decode=_linear_decode(reads_cache), softmax_comparable=False)


@register_method("cx_linear_decode", LINEAR_CAPS)
def build_linear_decode(ctx):
    """Causal linear attention (elu+1), decoding through its state."""
    return _linear(ctx, reads_cache=False)


@register_method("cx_linear_decode_reads_cache", LINEAR_CAPS)
def build_linear_decode_reads_cache(ctx):
    """Broken: the decode step reads the whole cache instead of its state."""
    return _linear(ctx, reads_cache=True)


# ---- (e) extra inputs: a log-gate per key, with a gradient ------------------------------------------------------
def _gated(ctx, ignore_gate_grad: bool):
    case = ctx.case
    visible = _visible(ctx)

    def fast(q, k, v, g):
        gate = g.detach() if ignore_gate_grad else g
        return _softmax_attend(q, k, v, visible, bias=gate[:, :, None, :])

    def reference(q, k, v, g):
        return _softmax_attend(q, k, v, visible, bias=g[:, :, None, :])

    return Prepared(fn=fast, reference=reference, softmax_comparable=False,
                    extras={"g": Extra(shape=(case.batch, case.heads_q, case.seq_kv), init="logsigmoid")})


GATED_CAPS = Capabilities(family="approx", exact=False, masks={"full", "causal"}, backward=True)


@register_method("cx_gated", GATED_CAPS)
def build_gated(ctx):
    """Softmax attention with a log-gate added per key (an extra input the harness creates)."""
    return _gated(ctx, ignore_gate_grad=False)


@register_method("cx_gated_no_grad", GATED_CAPS)
def build_gated_no_grad(ctx):
    """Broken: the fast path cuts the gate's gradient."""
    return _gated(ctx, ignore_gate_grad=True)


# ---- (f) layer form: a causal mean mixer with a learned projection ----------------------------------------------
def _layer(ctx):
    case = ctx.case
    width = case.heads_q * case.head_dim
    gen = torch.Generator(device="cpu").manual_seed(case.seed)
    proj = (torch.randn(width, width, generator=gen) / math.sqrt(width)).to(ctx.device).requires_grad_(True)

    def fast(x):
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return (torch.cumsum(x, dim=1) / counts) @ proj.to(x.dtype)

    def reference(x):
        seq = x.shape[1]
        average = torch.ones(seq, seq, dtype=x.dtype, device=x.device).tril()
        average = average / average.sum(-1, keepdim=True)
        return (average @ x) @ proj.to(x.dtype)

    flops = 2.0 * case.batch * case.seq_q * width * width + 2.0 * case.batch * case.seq_q * width
    return Prepared(fn=fast, reference=reference, parameters=[proj], flops=flops)


@register_method("cx_layer", Capabilities(family="layer", exact=False, form="layer", masks={"causal"},
                                          causal_only=True, backward=True))
def build_layer(ctx):
    """A layer over x [batch, seq, heads_q * head_dim]: causal running mean, then a learned projection."""
    return _layer(ctx)


@register_method("cx_layer_exact_default", Capabilities(family="layer", form="layer", masks={"causal"},
                                                        causal_only=True, backward=True))
def build_layer_exact_default(ctx):
    """The same layer with `exact` left at its default: a layer is always gated against its own reference."""
    return _layer(ctx)


# ---- (g) attended pairs: top-k routing per query ----------------------------------------------------------------
def _topk_keep(q, k, visible, topk: int) -> torch.Tensor:
    """bool [B, H, Sq, Skv]: each query's top-k visible keys by fp32 score (routing: data-dependent)."""
    scores = (q.float() @ k.float().transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    chosen = scores.topk(min(topk, scores.shape[-1]), dim=-1).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)
    return keep & visible


@register_method("cx_topk", Capabilities(family="sparse", exact=False, masks={"full", "causal"}))
def build_topk(ctx):
    """Each query attends its top-k visible keys (k = method_options.cx_topk.topk, default 8)."""
    topk = ctx.param("topk", 8)
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"method_options.cx_topk.topk: must be a positive integer, got {topk!r}")
    visible = _visible(ctx)

    def fast(q, k, v):
        return _softmax_attend(q, k, v, _topk_keep(q, k, visible, topk))

    def reference(q, k, v):
        """Readable: a key is kept when its score reaches the row's k-th largest visible score."""
        scores = (q @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
        n = min(topk, scores.shape[-1])
        kth = scores.sort(dim=-1, descending=True).values[..., n - 1 : n]
        return _softmax_attend(q, k, v, (scores >= kth) & visible)

    return Prepared(fn=fast, reference=reference,
                    attended_pairs=lambda q, k, v: int(_topk_keep(q, k, visible, topk).sum()),
                    phases={"routing": lambda q, k, v: _topk_keep(q, k, visible, topk)})


# ---- (h) the typed mask description ------------------------------------------------------------------------------
MASK_CAPS = Capabilities(family="exact", masks={"full", "causal"}, cross=True)


@register_method("cx_typed_mask", MASK_CAPS)
def build_typed_mask(ctx):
    """Exact attention from ctx.mask.causal and ctx.mask.offset (bottom-right): right on causal cross too."""
    visible = _visible(ctx)
    return lambda q, k, v: _softmax_attend(q, k, v, visible)


@register_method("cx_top_left", MASK_CAPS)
def build_top_left(ctx):
    """Broken: SDPA's is_causal=True is top-left aligned, the harness's causal is bottom-right."""
    causal = ctx.mask.causal
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# ---- (i) opt-in capabilities: nothing declared ------------------------------------------------------------------
@register_method("cx_plain", Capabilities())
def build_plain(ctx):
    """SDPA with nothing declared: full and causal self-attention, forward, MHA only."""
    if ctx.mask.seq_q != ctx.mask.seq_kv:
        raise Unsupported("planner bug: a cross case reached a method that declares no cross")
    causal = ctx.mask.causal
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# ---- (k) rows that see no key: a value small enough to pass the output's tolerance -------------------------------
@register_method("cx_empty_rows_small", MASK_CAPS)
def build_empty_rows_small(ctx):
    """Broken: exact where a query sees keys, 1e-5 where it sees none: too small for the output's relative
    error to notice at fp32, so only the empty-row rule (output 0 there) catches it."""
    visible = _visible(ctx)
    empty = ~visible.any(dim=1)

    def attend(q, k, v):
        out = _softmax_attend(q, k, v, visible)
        return out.masked_fill(empty[None, None, :, None], 1e-5)

    return attend
