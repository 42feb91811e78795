"""Mask specs compiled to every representation a method needs (see ``masks.base``).

Importing ``masks`` registers every built-in mask; ``list_masks()`` names them and ``make_mask(entry)`` builds
a validated spec from a config entry. Plugins add masks with ``register_mask`` (a spec class) or
``register_mask_mod`` (a FlexAttention function, see ``masks.custom``).
"""
from .base import BlockLayout, BoundMask, MaskParamError, MaskSpec, MaskTooLarge, VarlenForm
from .registry import MASKS, list_masks, make_mask, register_mask
from . import basic, document, sparse, window  # noqa: F401  (register the built-in masks)
from .custom import register_mask_mod
from .describe import describe
from .picture import save_mask_png

__all__ = [
    "BlockLayout",
    "BoundMask",
    "MASKS",
    "MaskParamError",
    "MaskSpec",
    "MaskTooLarge",
    "VarlenForm",
    "describe",
    "list_masks",
    "make_mask",
    "register_mask",
    "register_mask_mod",
    "save_mask_png",
]
