"""Mask specs compiled to every representation a method needs (see ``masks.base``)."""
from .base import BlockLayout, BoundMask, MaskParamError, MaskSpec, MaskTooLarge, VarlenForm
from .registry import MASKS, list_masks, make_mask, register_mask
from . import basic  # noqa: F401  (registers full, causal)

__all__ = [
    "BlockLayout",
    "BoundMask",
    "MASKS",
    "MaskParamError",
    "MaskSpec",
    "MaskTooLarge",
    "VarlenForm",
    "list_masks",
    "make_mask",
    "register_mask",
]
