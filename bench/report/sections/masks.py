"""Masks: a picture of every mask at the largest shape it was measured at."""
from __future__ import annotations

from attnbench.report import plots
from attnbench.report.context import Context
from attnbench.report.model import Section, Text, plot

MASK_PICTURE_PIXELS = 128


def section_masks(ctx: Context) -> Section | None:
    """What each mask looks like, at the largest shape it was measured at (block-averaged pictures, exact
    fractions of visible pairs per pixel), so a reader sees the pattern behind every figure."""
    from attnbench import masks

    kernel = ctx.kernel
    if kernel.empty:
        return None
    tiles, missing = [], []
    for label, rows in kernel.groupby("mask", sort=True):
        largest = rows.assign(area=rows["seq_q"].astype(float) * rows["seq_kv"].astype(float)).sort_values(
            "area").iloc[-1]
        seq_q, seq_kv = int(largest["seq_q"]), int(largest["seq_kv"])
        try:
            bound = masks.make_mask(label).bind(seq_q, seq_kv)
            image = masks.picture.mask_image(bound, MASK_PICTURE_PIXELS).numpy()
            density = bound.visible_pairs() / float(seq_q * seq_kv)
        except Exception as exc:  # noqa: BLE001 - a mask this install cannot rebuild is named, not drawn
            missing.append(f"{label} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            continue
        tiles.append(plots.Tile(label, image, f"{plots.tokens(seq_q)} × {plots.tokens(seq_kv)}, "
                                              f"density {density:.2%}"))
    section = Section("masks", "Masks")
    section.blocks.append(Text(
        "Each mask at the largest shape it was measured at: query rows down, key columns across; a pixel's "
        "shade is the exact fraction of its pairs that are visible."))
    if tiles:
        section.blocks.append(plot("masks", "Pictures of the masks in this report",
                                   "The masks of this report.", plots.mask_gallery, "Masks", tiles))
    if missing:
        section.blocks.append(Text("Not drawn (this install cannot rebuild them): " + "; ".join(missing) + "."))
    return section
