"""Methods for tests/test_unknown_options.py: how ``method_options`` keys are read and refused.

- ``uo_plugin`` declares no options (a user's plugin): its options are what its builder reads, ``scale`` through
  ``ctx.param`` and, only when ``mode`` is ``tempered``, ``temperature`` through ``ctx.params[...]`` (direct
  access counts as a read).
- ``uo_declared`` declares ``scale``, ``mode``, ``temperature`` and reads ``temperature`` only when ``mode`` is
  ``tempered`` (a conditional option), without refusing it otherwise; it counts its builds in ``BUILDS``.
- ``uo_liar`` declares ``scale`` but also reads ``hidden``: a registration that under-declares (a bug).
"""
from __future__ import annotations

import torch.nn.functional as F

from attnbench.methods import Capabilities, register_method

CAPS = dict(family="test", masks={"full", "causal"})
BUILDS = {"uo_declared": 0}


def _attention(ctx, scale: float):
    causal = ctx.mask.causal

    def attend(q, k, v):
        # scale 1.0 is plain softmax attention (the gate passes); another scale is a different operator
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale * q.shape[-1] ** -0.5)

    return attend


def _scale(ctx) -> float:
    scale = float(ctx.param("scale", 1.0))
    if ctx.param("mode", "plain") == "tempered":
        scale /= float(ctx.params["temperature"]) if "temperature" in ctx.params else 1.0
    return scale


@register_method("uo_plugin", Capabilities(**CAPS))
def build_uo_plugin(ctx):
    """Exact attention; ``scale`` (1.0), ``mode`` (plain | tempered), ``temperature`` (read when tempered)."""
    return _attention(ctx, _scale(ctx))


@register_method("uo_declared", Capabilities(**CAPS), options=("scale", "mode", "temperature"))
def build_uo_declared(ctx):
    """As uo_plugin, with its options declared."""
    BUILDS["uo_declared"] += 1
    return _attention(ctx, _scale(ctx))


@register_method("uo_liar", Capabilities(**CAPS), options=("scale",))
def build_uo_liar(ctx):
    """Reads an option its registration does not declare."""
    ctx.param("hidden", 0)
    return _attention(ctx, float(ctx.param("scale", 1.0)))
