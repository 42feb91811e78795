"""Control mixers for the task tests: they see no other token, so no task that needs attention can be learned."""
from __future__ import annotations

import torch

from attnbench.methods import Capabilities, register_method

CONTROL = dict(family="control", devices=("cpu", "cuda"), masks={"any"}, cross=True, gqa=True, backward=True)


@register_method("q_nomix", Capabilities(**CONTROL))
def build_nomix(ctx):
    """Each query sees only itself: self attention returns its own value, cross attention (whose queries have no
    token of their own among the keys) returns zeros."""
    same = ctx.case.seq_q == ctx.case.seq_kv

    def nomix(q, k, v):
        if same:
            return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return torch.zeros_like(q) * q  # keeps a gradient path, carries nothing from k or v

    return nomix


@register_method("q_nan", Capabilities(**CONTROL))
def build_nan(ctx):
    """Exact attention until its output turns NaN (every call): training must end as diverged."""
    import torch.nn.functional as F

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.mask.causal) * float("nan")

    return attend


@register_method("q_oom", Capabilities(**CONTROL))
def build_oom(ctx):
    """Runs out of memory on its first call (an OOM row, and the run goes on)."""

    def attend(q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 TiB (deliberate)")

    return attend


@register_method("q_refuses", Capabilities(**CONTROL))
def build_refuses(ctx):
    """Declares the patterns, then refuses every case in its builder."""
    from attnbench.methods import Unsupported

    raise Unsupported("deliberately refuses every case")


CALLS: dict = {"prepare": 0}


@register_method("q_contract", Capabilities(**CONTROL, exact=False))
def build_contract(ctx):
    """Uses the whole contract: a learnable temperature (Prepared.parameters), an extra input, and a prepare
    step that counts its calls (``CALLS``). Softmax attention with a learned scale (self patterns)."""
    import torch.nn.functional as F

    from attnbench.methods import Extra, Prepared

    temperature = torch.zeros((), device=ctx.device, requires_grad=True)

    def prepare(q, k, v, bias):
        CALLS["prepare"] += 1
        return {"shift": torch.zeros((), device=q.device)}

    def attend(q, k, v, bias, shift):
        out = F.scaled_dot_product_attention(q * torch.exp(temperature).to(q.dtype), k, v, is_causal=ctx.mask.causal)
        return out + shift + 0 * bias.sum()

    prepared = Prepared(fn=attend, reference=attend, prepare=prepare, parameters=[temperature],
                        extras={"bias": Extra(shape=(1,), init="randn")})
    CALLS["temperature"] = temperature
    return prepared


@register_method("q_layer_mean", Capabilities(**{**CONTROL, "cross": False}, form="layer"))
def build_layer_mean(ctx):
    """A layer-form mixer: the running (causal) or global mean of x, through a learned linear map."""
    from attnbench.methods import Prepared

    width = ctx.case.heads_q * ctx.case.head_dim
    gen = torch.Generator(device="cpu").manual_seed(ctx.case.seed)
    weight = (torch.randn(width, width, generator=gen) / width ** 0.5).to(ctx.device).requires_grad_(True)

    def mix(x):
        if ctx.mask.causal:
            mean = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        else:
            mean = x.mean(1, keepdim=True).expand_as(x)
        return mean @ weight.to(x.dtype)

    return Prepared(fn=mix, reference=mix, parameters=[weight], flops=2.0 * width * width * ctx.case.seq_q)
