"""Control mixers for the task tests: they see no other token, so no task that needs attention can be learned."""
from __future__ import annotations

import torch

from attnbench.methods import Capabilities, register_method

CONTROL = dict(family="control", devices=("cpu", "cuda"), masks={"any"}, cross=True, gqa=True, backward=True)


@register_method("t_nomix", Capabilities(**CONTROL))
def build_nomix(ctx):
    """Each query sees only itself: self attention returns its own value, cross attention (whose queries have no
    token of their own among the keys) returns zeros."""
    same = ctx.case.seq_q == ctx.case.seq_kv

    def nomix(q, k, v):
        if same:
            return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return torch.zeros_like(q) * q  # keeps a gradient path, carries nothing from k or v

    return nomix
