"""User masks from plugin modules: register a FlexAttention ``mask_mod`` under a name.

A plugin module (named in the config key ``plugins``) registers its masks on import::

    # my_masks.py
    from attnbench import masks

    def checkerboard(b, h, q_idx, kv_idx):
        # broadcasting torch ops only: no Python `if` on tensor values, no in-place ops
        return (q_idx // 64 + kv_idx // 64) % 2 == 0

    masks.register_mask_mod("checkerboard", checkerboard, causal=False,
                            description="64-token checkerboard")

Then ``mask: checkerboard`` works like any built-in mask. The function gets the batch index, head index, and
query and key index tensors (of any broadcastable shapes) and returns a bool tensor of their broadcast shape.
Tensors it captures must live on the device it runs on (or be made from the index tensors' device).
Every other representation is the generic one, which evaluates the function: counting visible pairs and
building block layouts take O(seq_q * seq_kv) time (in bounded memory), so prefer built-in masks at very long
sequences.
"""
from __future__ import annotations

import dataclasses
from .base import BoundMask, MaskMod, MaskSpec
from .registry import register_mask


class BoundMaskMod(BoundMask):
    """A user ``mask_mod``; every other representation is the generic one."""

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.spec.mask_fn(b, h, q_idx, kv_idx)


def register_mask_mod(name: str, fn: MaskMod, causal: bool = False, description: str = "") -> type[MaskSpec]:
    """Register ``fn(b, h, q_idx, kv_idx) -> bool tensor`` as the parameterless mask ``name``; returns its spec
    class. ``causal`` declares that no query sees a later key (self-attention sense)."""
    if not callable(fn):
        raise TypeError(f"register_mask_mod({name!r}): fn must be callable, got {type(fn).__name__}")
    namespace = {
        "name": name,
        "causal": bool(causal),
        "description": description or (fn.__doc__ or "").strip().split("\n")[0] or f"user mask_mod {fn.__name__}",
        "bound_cls": BoundMaskMod,
        "mask_fn": staticmethod(fn),
    }
    cls = dataclasses.make_dataclass(f"MaskMod_{name}", [], bases=(MaskSpec,), frozen=True, namespace=namespace)
    return register_mask(cls)
