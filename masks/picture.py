"""Pictures of masks: a PNG of which (query, key) pairs are visible.

Large masks are downsampled by block averaging (each pixel is the exact fraction of visible pairs in its
tile, from ``block_counts``), so a picture never needs the dense mask. Matplotlib's Agg canvas is used
directly: importing this module does not change the process's matplotlib backend.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .base import BoundMask, MaskSpec, block_extents

DEFAULT_SEQ = 1024


def mask_image(bound: BoundMask, max_pixels: int = 512) -> torch.Tensor:
    """Fraction of visible pairs per pixel, float32 ``[<= max_pixels, <= max_pixels]`` (1 pixel = 1 pair when
    the mask is small enough)."""
    block_q, block_kv = math.ceil(bound.seq_q / max_pixels), math.ceil(bound.seq_kv / max_pixels)
    counts = bound.block_counts(block_q, block_kv).cpu()
    area = block_extents(bound.seq_q, block_q)[:, None] * block_extents(bound.seq_kv, block_kv)[None, :]
    return (counts / area).to(torch.float32)


def save_mask_png(
    mask: BoundMask | MaskSpec,
    path: str | Path,
    seq_q: int | None = None,
    seq_kv: int | None = None,
    max_pixels: int = 512,
) -> Path:
    """Write a picture of ``mask`` to ``path`` and return the path. A spec is bound to ``seq_q`` x ``seq_kv``
    (default 1024, and ``seq_kv = seq_q``); a bound mask keeps its own lengths. The title gives the label,
    the lengths, the density and the visible pairs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bound = mask if isinstance(mask, BoundMask) else mask.bind(seq_q or DEFAULT_SEQ, seq_kv or seq_q or DEFAULT_SEQ)
    image = mask_image(bound, max_pixels).numpy()
    pairs = bound.visible_pairs()
    aspect_ratio = bound.seq_q / bound.seq_kv
    figure = Figure(figsize=(6.0, 6.0 if 0.25 <= aspect_ratio <= 4 else 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    shown = axes.imshow(
        image, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest",
        extent=(0, bound.seq_kv, bound.seq_q, 0), aspect="equal" if 0.25 <= aspect_ratio <= 4 else "auto",
    )
    axes.set_xlabel("key index")
    axes.set_ylabel("query index")
    axes.set_title(
        f"{bound.label}  [{bound.seq_q} x {bound.seq_kv}]\n"
        f"density {pairs / (bound.seq_q * bound.seq_kv):.2%}, {pairs:,} visible pairs",
        fontsize=10,
    )
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="fraction visible")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
