"""The one style module: every figure of a report is drawn here, in one look, readable in print.

Figures are built with matplotlib's object API (no pyplot, so no backend switch, no global state and nothing
to close) and returned as ``Figure``; ``to_png`` renders one with Agg. Lengths double along a sweep, so length axes are
log base 2 with token labels (512, 1k, 64k, 1M); times, rates and memory are log base 10. Only measured values
are drawn as values: a failed case is an "x" in the line's colour in a band at the bottom of the panel, with
its status written beside it.
"""
from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from matplotlib import rc_context
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

DPI = 100
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titley": 1.0,  # a fixed title position: automatic placement costs a layout pass per axis
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 4.5,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}
# Okabe-Ito (colour-blind safe; its yellow swapped for a darker olive that reads on white), then more hues;
# markers and dashes keep lines apart in grey print.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#999933", "#000000",
          "#8c564b", "#7f7f7f", "#bcbd22", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
DASHES = ("-", "--", "-.", ":")
STATUS_SHORT = {"unsupported": "unsup."}  # status words under the curves; the others are short already
STATUS_COLORS = {
    "ok": "#cfe8cf", "unsupported": "#e4e4e4", "wrong": "#f4a6a6", "oom": "#f9d19c", "error": "#d9c2ea",
    "crashed": "#e07a7a", "timeout": "#f3e59a",
}


@dataclass(frozen=True)
class LineStyle:
    color: str
    marker: str
    dash: str


class Palette:
    """A fixed line style per series label, the same in every figure of a report."""

    def __init__(self, labels):
        combos = itertools.cycle(
            (color, marker, dash) for dash in DASHES for color, marker in zip(COLORS, MARKERS))
        self.styles = {label: LineStyle(*next(combos)) for label in sorted(set(labels))}

    def __getitem__(self, label: str) -> LineStyle:
        return self.styles[label]


@dataclass
class Series:
    """One line: measured points (x, y) with an optional spread band (low, high), and failed x positions."""

    label: str
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    failed: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Panel:
    """One axis. ``reference``: (y, label) draws a labelled dashed horizontal line (e.g. the measured peak)."""

    title: str
    ylabel: str
    series: list[Series]
    reference: tuple[float, str] | None = None


@dataclass
class Points:
    """Scatter points of one label."""

    label: str
    x: np.ndarray
    y: np.ndarray


def to_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buffer = io.BytesIO()
    with rc_context(STYLE):
        fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def tokens(value: float, _pos=None) -> str:
    """512, 1k, 64k, 1M: a length in tokens for an axis tick."""
    if value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{int(value) >> 20}M"
    if value >= 1024 and value % 1024 == 0:
        return f"{int(value) >> 10}k"
    return f"{value:g}"


def number(value: float, _pos=None) -> str:
    """A tick label for a log axis of measured quantities: 0.002, 0.5, 20, 5000, 2e+05."""
    return f"{value:g}"


def log_ticks(low: float, high: float, base: int, subs: tuple[float, ...] = (1.0,), most: int = 7) -> list[float]:
    """Tick positions sub x base^k inside [low, high], at most ``most``.

    Too many 1-2-5 ticks fall back to powers of ``base``; too many of those keep every n-th, counted from the
    top. A range holding no such value gets three ticks spread geometrically, rounded to 2 digits.
    """
    first, last = math.floor(math.log(low, base)), math.ceil(math.log(high, base))
    candidates = (sub * float(base) ** k for k in range(first, last + 1) for sub in subs)
    ticks = [tick for tick in candidates if low <= tick <= high]
    if len(ticks) > most and len(subs) > 1:
        return log_ticks(low, high, base, (1.0,), most)
    if len(ticks) > most:
        stride = -(-len(ticks) // most)
        return ticks[::-1][::stride][::-1]
    if not ticks:
        return [float(f"{t:.2g}") for t in np.geomspace(low, high, 5)[1:4]]
    return ticks


def log_axes(ax, x_base: int, x_formatter=number) -> None:
    """Log axes with labelled ticks at 1, 2, 5 x 10^k (y) or powers of ``x_base`` (x), and no minor ticks.

    Minor ticks are off on purpose: they cost most of the drawing time and add nothing in print.
    """
    ax.set_xscale("log", base=x_base)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=x_base, numticks=7))
    ax.xaxis.set_major_formatter(FuncFormatter(x_formatter))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=10))
    ax.yaxis.set_major_formatter(FuncFormatter(number))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())


def _panel_figure(n_rows: int, n_cols: int, n_legend: int, title: str,
                  row_titles: list[str] | None = None) -> tuple[Figure, np.ndarray]:
    """A grid of ``n_rows`` x ``n_cols`` axes with room for the title, a bold heading above each row (when
    ``row_titles``) and a legend of ``n_legend`` entries below; margins are fixed in inches so that labels fit
    whatever the grid."""
    legend_rows = -(-max(n_legend, 1) // 4)
    left, right, gap, panel_width, panel_height, top = 0.85, 0.2, 0.85, 3.5, 2.7, 0.6
    row_gap = 1.05 if row_titles else 0.8
    bottom = 0.65 + 0.2 * legend_rows
    width = max(left + n_cols * panel_width + (n_cols - 1) * gap + right, 0.5 + 0.085 * len(title))
    height = top + (0.3 if row_titles else 0) + n_rows * panel_height + (n_rows - 1) * row_gap + bottom
    fig = Figure(figsize=(width, height), dpi=DPI)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - (top + (0.3 if row_titles else 0)) / height,
                        bottom=bottom / height, wspace=gap / panel_width, hspace=row_gap / panel_height)
    fig.suptitle(title, fontsize=11, y=1 - 0.15 / height, va="top")
    for row, row_title in enumerate(row_titles or []):
        y = 1 - (top + (0.3 if row_titles else 0) + row * (panel_height + row_gap) - 0.32) / height
        fig.text(left / width, y, row_title, fontsize=9.5, fontweight="bold", va="bottom")
    return fig, axes


def _legend(fig: Figure, handles: list, columns: int = 4) -> None:
    fig.legend(handles=handles, loc="lower center", ncol=min(columns, max(len(handles), 1)), frameon=False)


def line_panels(title: str, rows: list[tuple[str, list[Panel]]], palette: Palette, xlabel: str) -> Figure:
    """A grid of panels: one row per (heading, panels) (e.g. one head shape), one line per series label,
    log-log, one legend below. Rows must have the same number of panels; an empty heading draws none.

    The x axis is log base 2 (lengths double), labelled as tokens.
    """
    with rc_context(STYLE):
        panels = [panel for _, row in rows for panel in row]
        labels = sorted({s.label for panel in panels for s in panel.series})
        any_failed = any(s.failed for panel in panels for s in panel.series)
        headings = [heading for heading, _ in rows]
        fig, axes = _panel_figure(len(rows), len(rows[0][1]), len(labels) + any_failed, title,
                                  headings if any(headings) else None)
        for axes_row, (_, row) in zip(axes, rows):
            for ax, panel in zip(axes_row, row):
                _draw_panel(ax, panel, palette, xlabel)
        handles = [Line2D([], [], color=palette[label].color, marker=palette[label].marker,
                          linestyle=palette[label].dash, label=label) for label in labels]
        if any_failed:
            handles.append(Line2D([], [], color="0.3", marker="x", linestyle="none",
                                  label="failed case (status at the bottom)"))
        _legend(fig, handles)
    return fig


def _draw_panel(ax, panel: Panel, palette: Palette, xlabel: str) -> None:
    ax.set_title(panel.title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(panel.ylabel)
    log_axes(ax, 2, tokens)
    xs, ys = [], []
    failed = [s for s in panel.series if s.failed]
    for series in panel.series:
        style = palette[series.label]
        if len(series.x):
            ax.plot(series.x, series.y, color=style.color, marker=style.marker, linestyle=style.dash)
            if series.low is not None and series.high is not None:
                ax.fill(np.r_[series.x, series.x[::-1]], np.r_[series.low, series.high[::-1]], color=style.color,
                        alpha=0.15, linewidth=0)
            xs.extend(series.x)
            ys.extend(series.y)
        xs.extend(x for x, _ in series.failed)
    if panel.reference and ys:
        value, label = panel.reference
        ax.axhline(value, color="0.35", linestyle="--", linewidth=1)
        ax.text(0.02, value, label, transform=ax.get_yaxis_transform(), fontsize=7, color="0.35", va="bottom")
        ys.append(value)
    blend = ax.get_xaxis_transform()
    for band, series in enumerate(failed):
        height = 0.04 + 0.055 * band
        color = palette[series.label].color
        xs_failed = [x for x, _ in series.failed]
        ax.plot(xs_failed, [height] * len(xs_failed), transform=blend, marker="x", color=color, markersize=6,
                linestyle="none", clip_on=False)
        previous = None
        for x, status in series.failed:  # the status is written where it starts, not at every repeat
            if status != previous:
                ax.annotate(STATUS_SHORT.get(status, status), (x, height), xycoords=blend, xytext=(4, 0),
                            textcoords="offset points", fontsize=6.5, color=color, va="center")
            previous = status
    if xs:
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 1.25, hi * 1.6)
        ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi, 2)))
    if ys:
        lo, hi = min(ys), max(ys)
        # leave the bottom band of the panel free for the failed-case markers
        bottom_share = 0.08 + 0.055 * len(failed)
        span = np.log10(hi / lo) if hi > lo else 1.0
        bottom, top = lo / 10 ** (span * bottom_share / (1 - bottom_share) + 0.05), hi * 10 ** (0.08 * span + 0.05)
        ax.set_ylim(bottom, top)
        # fixed ticks inside the view: a locator's ticks beyond the limits cost drawing time for nothing
        ax.yaxis.set_major_locator(FixedLocator(log_ticks(bottom, top, 10, (1.0, 2.0, 5.0), most=8)))
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no measured values", transform=ax.transAxes, ha="center", va="center", color="0.4")


def heatmap(title: str, values: np.ndarray, row_labels: list[str], col_labels: list[str], colorbar: str,
            center: float | None = None) -> Figure:
    """Annotated matrix; NaN cells show "—" (nothing measured). ``center``: diverging log colours around it."""
    with rc_context(STYLE):
        longest_col = max((len(s) for s in col_labels), default=1)
        longest_row = max((len(s) for s in row_labels), default=1)
        bottom_in, left_in = 0.35 + 0.04 * longest_col, 0.3 + 0.065 * longest_row
        height = 0.9 + bottom_in + 0.34 * len(row_labels)
        width = min(left_in + 1.0 + max(0.95 * len(col_labels), 3.0), 18)
        fig = Figure(figsize=(width, height), dpi=DPI)
        ax = fig.subplots()
        finite = values[np.isfinite(values) & (values > 0)]
        if center is not None and len(finite):
            span = max(abs(np.log10(finite / center)).max(), 0.05)
            norm = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
            shown, cmap = np.log10(values / center), "RdBu"
        else:
            norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if len(finite) else None
            shown, cmap = values, "viridis"
        image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=norm, aspect="auto")
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right")
        ax.set_yticks(range(len(row_labels)), row_labels)
        ax.grid(False)
        for (i, j), value in np.ndenumerate(values):
            if not np.isfinite(value) or norm is None:
                ax.text(j, i, "—", ha="center", va="center", fontsize=8)
                continue
            level = float(norm(shown[i, j]))
            dark = level < 0.2 or level > 0.8 if center is not None else level < 0.5
            ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
        bar = fig.colorbar(image, ax=ax, fraction=0.04)
        bar.set_label(colorbar)
        if center is not None and len(finite):
            bar.formatter = FuncFormatter(lambda v, _pos: f"{center * 10 ** v:.2g}")
            bar.update_ticks()
        ax.set_title(title)
        fig.subplots_adjust(left=left_in / width, bottom=bottom_in / height, top=1 - 0.45 / height, right=0.97)
    return fig


def roofline(title: str, panels: list[tuple[str, list[Points]]], palette: Palette, peak_tflops: float,
             bandwidth_tbps: float) -> Figure:
    """Achieved TFLOP/s against arithmetic intensity (FLOP/byte) under the measured ceilings.

    Ceiling: min(peak_tflops, intensity * bandwidth_tbps); the ridge is at peak / bandwidth FLOP/byte.
    """
    with rc_context(STYLE):
        labels = sorted({p.label for _, points in panels for p in points})
        fig, grid = _panel_figure(1, len(panels), len(labels), title)
        axes = grid[0]
        ridge = peak_tflops / bandwidth_tbps
        for ax, (panel_title, points) in zip(axes, panels):
            intensities = np.concatenate([p.x for p in points] + [np.array([ridge])])
            lo, hi = intensities.min() / 4, max(intensities.max() * 4, ridge * 4)
            intensity = np.geomspace(lo, hi, 200)
            ax.plot(intensity, np.minimum(peak_tflops, intensity * bandwidth_tbps), color="0.25", linewidth=1.2)
            ax.annotate(f"measured peak {peak_tflops:.0f} TFLOP/s (bf16 matmul)", (hi, peak_tflops),
                        xytext=(-4, 4), textcoords="offset points", ha="right", fontsize=7, color="0.25")
            ax.annotate(f"copy {bandwidth_tbps:.2f} TB/s", (lo * 1.5, lo * 1.5 * bandwidth_tbps), xytext=(6, -2),
                        textcoords="offset points", fontsize=7, color="0.25")
            for p in points:
                style = palette[p.label]
                ax.plot(p.x, p.y, linestyle="none", marker=style.marker, color=style.color, alpha=0.75)
            log_axes(ax, 10)
            ax.set_xlabel("arithmetic intensity (FLOP/byte)")
            ax.set_ylabel("achieved TFLOP/s")
            ax.set_title(panel_title)
        _legend(fig, [Line2D([], [], color=palette[label].color, marker=palette[label].marker, linestyle="none",
                             label=label) for label in labels])
    return fig


@dataclass
class ParetoPanel:
    """One axis of a Pareto figure: points of y (lower or higher is better) against time per call.

    ``front``: the Pareto front as an (n, 2) array of (x, y), sorted by x; ``reference``: (x, label) draws a
    labelled dotted vertical line (e.g. the baseline's time). ``log_y``: the y axis is logarithmic when true; None
    (default): when every y is positive (an error spanning decades); a bounded metric (accuracy) wants False.
    ``label_front``: name the front's points on the axis (the legend alone matches 40 markers poorly).
    """

    title: str
    ylabel: str
    points: list[Points]
    front: np.ndarray
    reference: tuple[float, str] | None = None
    log_y: bool | None = None
    label_front: bool = False


def pareto(title: str, panels: list[ParetoPanel], palette: Palette) -> Figure:
    """A measure (e.g. the distance from exact attention) against time per call, one panel per case, with
    the Pareto front dashed."""
    with rc_context(STYLE):
        labels = sorted({p.label for panel in panels for p in panel.points})
        fig, grid = _panel_figure(1, len(panels), len(labels) + 1, title)
        extra_lines = max(panel.title.count("\n") for panel in panels)
        if extra_lines:  # room for panel titles of several lines under the figure title
            height = fig.get_figheight()
            fig.subplots_adjust(top=fig.subplotpars.top - 0.17 * extra_lines / height)
        axes = grid[0]
        for ax, panel in zip(axes, panels):
            for p in panel.points:
                style = palette[p.label]
                ax.plot(p.x, p.y, linestyle="none", marker=style.marker, color=style.color, markersize=6)
            if len(panel.front):
                ax.plot(panel.front[:, 0], panel.front[:, 1], color="0.3", linestyle="--", linewidth=1,
                        drawstyle="steps-post")
            if panel.reference:
                value, label = panel.reference
                ax.axvline(value, color="0.35", linestyle=":", linewidth=1)
                ax.text(value, 0.98, label, transform=ax.get_xaxis_transform(), rotation=90, fontsize=7,
                        color="0.35", ha="right", va="top")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=10))
            ax.xaxis.set_major_formatter(FuncFormatter(number))
            ax.xaxis.set_minor_locator(NullLocator())
            if panel.label_front and len(panel.front):
                on_front = {(float(x), float(y)) for x, y in panel.front}
                named = sorted((float(x), float(y), p.label) for p in panel.points for x, y in zip(p.x, p.y)
                               if (float(x), float(y)) in on_front)
                for i, (x, y, label) in enumerate(named):  # alternate above / below: near points stay legible
                    ax.annotate(label, (x, y), xytext=(4, 4 if i % 2 == 0 else -10), textcoords="offset points",
                                fontsize=6.5, color="0.2")
            ys = np.concatenate([p.y for p in panel.points]) if panel.points else np.array([])
            log_y = panel.log_y if panel.log_y is not None else bool(len(ys) and (ys > 0).all())
            if log_y:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=10))
                ax.yaxis.set_major_formatter(FuncFormatter(number))
                ax.yaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("time per call (ms)")
            ax.set_ylabel(panel.ylabel)
            ax.set_title(panel.title)
        handles = [Line2D([], [], color=palette[label].color, marker=palette[label].marker, linestyle="none",
                          label=label) for label in labels]
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="Pareto front"))
        _legend(fig, handles)
    return fig


__all__ = ["STATUS_COLORS", "KernelBar", "Palette", "Panel", "ParetoPanel", "Points", "RankBars", "ScalingPanel",
           "Series", "Tile", "heatmap", "kernel_bars", "line_panels", "log_ticks", "mask_gallery", "number", "pareto",
           "rank_bars", "roofline", "scaling_panels", "scatter", "to_png", "tokens"]


@dataclass
class Tile:
    """One mask picture: the fraction of visible pairs per pixel, and its caption."""

    title: str
    image: np.ndarray
    caption: str


def mask_gallery(title: str, tiles: list[Tile], columns: int = 4) -> Figure:
    """A grid of mask pictures (query rows down, key columns across; darker = more pairs visible)."""
    import textwrap

    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    with rc_context(STYLE):
        fig = Figure(figsize=(3.3 * columns, 3.6 * rows + 0.5), dpi=DPI)
        axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
        for ax, tile in zip(axes, tiles):
            ax.imshow(tile.image, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.set_title("\n".join(textwrap.wrap(tile.title, 34)[:3]), fontsize=8)
            ax.set_xlabel(tile.caption, fontsize=8)
        for ax in axes[len(tiles):]:
            ax.set_visible(False)
        fig.suptitle(title)
        fig.tight_layout()
    return fig


@dataclass
class QualityPanel:
    """One task: its metric against length, one line per label (mean over seeds, band min..max)."""

    title: str
    ylabel: str
    series: list[Series]
    higher_is_better: bool = True


def quality_lines(title: str, panels: list[QualityPanel], palette: Palette, columns: int = 3) -> Figure:
    """A metric (accuracy, bits per character) against length per task: log-2 length axis, linear metric axis;
    failed cases are x marks at the bottom with their status, as in the curve figures."""
    with rc_context(STYLE):
        labels = sorted({s.label for panel in panels for s in panel.series})
        n_cols = min(columns, len(panels))
        n_rows = -(-len(panels) // n_cols)
        fig, axes = _panel_figure(n_rows, n_cols, len(labels), title)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, panel in zip(axes.flat, panels):
            ax.set_title(panel.title)
            ax.set_xlabel("length (tokens)")
            ax.set_ylabel(panel.ylabel + (" ↑" if panel.higher_is_better else " ↓"))
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(tokens))
            ax.xaxis.set_minor_locator(NullLocator())
            xs = []
            for series in panel.series:
                style = palette[series.label]
                if len(series.x):
                    ax.plot(series.x, series.y, color=style.color, marker=style.marker, linestyle=style.dash)
                    if series.low is not None and series.high is not None:
                        ax.fill_between(series.x, series.low, series.high, color=style.color, alpha=0.15, linewidth=0)
                xs.extend(series.x)
                blend = ax.get_xaxis_transform()
                for x, status in series.failed:
                    ax.plot([x], [0.04], transform=blend, marker="x", color=style.color, linestyle="none")
                    ax.annotate(STATUS_SHORT.get(status, status), (x, 0.04), xycoords=blend, xytext=(4, 0),
                                textcoords="offset points", fontsize=6.5, color=style.color, va="center")
                    xs.append(x)
            if xs:
                ax.set_xticks(sorted(set(xs)))
                ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
        _legend(fig, [Line2D([], [], color=palette[label].color, marker=palette[label].marker,
                             linestyle=palette[label].dash, label=label) for label in labels])
    return fig


def grid_maps(title: str, maps: list[tuple[str, np.ndarray]], row_labels: list[str], col_labels: list[str],
              colorbar: str) -> Figure:
    """Small linear heat maps in [0, 1] (e.g. needle accuracy by depth x length), one per panel title;
    NaN cells (not measured) are blank with a dash."""
    with rc_context(STYLE):
        n_cols = min(3, len(maps))
        n_rows = -(-len(maps) // n_cols)
        width, height = 0.9 + 3.2 * n_cols, 0.8 + (0.45 + 0.22 * len(row_labels)) * n_rows
        fig = Figure(figsize=(width, height), dpi=DPI)
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        image = None
        for ax in axes.flat[len(maps):]:
            ax.set_visible(False)
        for ax, (name, values) in zip(axes.flat, maps):
            image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_title(name)
            ax.set_xticks(range(len(col_labels)), col_labels)
            ax.set_yticks(range(len(row_labels)), row_labels)
            ax.grid(False)
            for (i, j), value in np.ndenumerate(values):
                text = "—" if not np.isfinite(value) else f"{value:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if np.isfinite(value) and value < 0.5 else "black")
        if image is not None:
            fig.colorbar(image, ax=list(axes.flat[:len(maps)]), fraction=0.03).set_label(colorbar)
        fig.suptitle(title, fontsize=11)
    return fig


# ------------------------------------------------------------------------------------- context-parallel figures
@dataclass
class ScalingPanel:
    """One axis of a scaling figure: a figure of merit against the world size, one line per layout.

    ``ideal``: "speedup" draws y = world size, "efficiency" draws y = 1 (dashed grey); ``impossible``: (world,
    value) points above what the world size allows, drawn as large red rings and labelled.
    """

    title: str
    ylabel: str
    series: list[Series]
    ideal: str | None = None
    impossible: list[tuple[float, float]] = field(default_factory=list)


def scaling_panels(title: str, rows: list[tuple[str, list[ScalingPanel]]], palette: Palette) -> Figure:
    """A grid of scaling panels (one row per heading), world size on a log-2 axis, linear y from 0."""
    with rc_context(STYLE):
        panels = [panel for _, row in rows for panel in row]
        labels = sorted({s.label for panel in panels for s in panel.series})
        impossible = any(panel.impossible for panel in panels)
        headings = [heading for heading, _ in rows]
        fig, axes = _panel_figure(len(rows), len(rows[0][1]), len(labels) + 1 + impossible, title,
                                  headings if any(headings) else None)
        for axes_row, (_, row) in zip(axes, rows):
            for ax, panel in zip(axes_row, row):
                worlds = sorted({float(x) for s in panel.series for x in s.x} | {1.0})
                ys = [float(y) for s in panel.series for y in s.y]
                for series in panel.series:
                    style = palette[series.label]
                    ax.plot(series.x, series.y, color=style.color, marker=style.marker, linestyle=style.dash)
                if panel.ideal == "speedup":
                    ax.plot(worlds, worlds, color="0.45", linestyle="--", linewidth=1)
                    ys.extend(worlds)
                elif panel.ideal == "efficiency":
                    ax.axhline(1.0, color="0.45", linestyle="--", linewidth=1)
                    ys.append(1.0)
                for x, y in panel.impossible:
                    ax.plot([x], [y], marker="o", markersize=13, markerfacecolor="none", markeredgecolor="#D00000",
                            markeredgewidth=2, linestyle="none")
                    ax.annotate("impossible", (x, y), xytext=(6, 6), textcoords="offset points", fontsize=7,
                                color="#D00000", fontweight="bold")
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_locator(FixedLocator(worlds))
                ax.xaxis.set_major_formatter(FuncFormatter(number))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.set_xlim(min(worlds) / 1.3, max(worlds) * 1.3)
                ax.set_ylim(0, max(ys + [1.0]) * 1.15)
                ax.set_xlabel("world size (devices)")
                ax.set_ylabel(panel.ylabel)
                ax.set_title(panel.title)
                if not ys:
                    ax.text(0.5, 0.5, "no measured values", transform=ax.transAxes, ha="center", color="0.4")
        handles = [Line2D([], [], color=palette[label].color, marker=palette[label].marker,
                          linestyle=palette[label].dash, label=label) for label in labels]
        handles.append(Line2D([], [], color="0.45", linestyle="--", label="ideal"))
        if impossible:
            handles.append(Line2D([], [], color="#D00000", marker="o", markerfacecolor="none", linestyle="none",
                                  label="impossible (speed-up above world size)"))
        _legend(fig, handles)
    return fig


@dataclass
class RankBars:
    """Per-rank times of one case (one bar per rank) with the mean as a line."""

    title: str
    ms: list[float]


def rank_bars(title: str, cases: list[RankBars]) -> Figure:
    """One panel per case: each rank's median time per call as a bar, the mean dashed, the slowest rank dark."""
    with rc_context(STYLE):
        fig, grid = _panel_figure(1, len(cases), 1, title)
        extra_lines = max(case.title.count("\n") for case in cases)
        if extra_lines:  # room for panel titles of several lines under the figure title
            fig.subplots_adjust(top=fig.subplotpars.top - 0.2 * extra_lines / fig.get_figheight())
        for ax, case in zip(grid[0], cases):
            ms = np.asarray(case.ms, dtype=float)
            colors = [COLORS[0] if value < ms.max() else COLORS[3] for value in ms]
            ax.bar(np.arange(len(ms)), ms, color=colors, width=0.7)
            ax.axhline(ms.mean(), color="0.3", linestyle="--", linewidth=1)
            ax.set_xticks(np.arange(len(ms)))
            ax.set_xlabel("rank")
            ax.set_ylabel("median time per call (ms)")
            ax.set_title(case.title, fontsize=8.5)
            ax.grid(axis="x", visible=False)
        _legend(fig, [Line2D([], [], color="0.3", linestyle="--", label="mean over ranks"),
                      Line2D([], [], color=COLORS[3], linewidth=6, label="slowest rank")])
    return fig


@dataclass
class KernelBar:
    """One method's profiled call: its largest kernels (name, µs per call), the rest of its summed kernel time
    (µs; None when unknown) and its timed time per call (µs; None when not measured)."""

    label: str
    kernels: list[tuple[str, float]]
    other_us: float | None
    timed_us: float | None


def kernel_bars(title: str, bars: list[KernelBar]) -> Figure:
    """One horizontal bar per method, stacked from its largest kernels' µs per call (a colour per kernel name,
    the same in every bar; names beyond the palette join "other kernels", grey), the timed time per call as a
    black tick. Bars in the given order, the first on top."""
    totals: dict[str, float] = {}
    for bar in bars:
        for name, us in bar.kernels:
            totals[name] = totals.get(name, 0.0) + us
    named = sorted(totals, key=lambda name: -totals[name])[:len(COLORS) - 1]
    colors = dict(zip(named, (c for c in COLORS if c != "#7f7f7f")))
    width = 9.0
    left = 0.3 + 0.065 * max(len(bar.label) for bar in bars)
    legend_rows = -(-(len(named) + 2) // 2)
    bottom, top = 0.55 + 0.22 * legend_rows, 0.55
    height = top + 0.38 * len(bars) + 0.3 + bottom
    with rc_context(STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI)
        ax = fig.subplots()
        fig.subplots_adjust(left=left / width, right=1 - 0.3 / width, top=1 - top / height, bottom=bottom / height)
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
        for y, bar in enumerate(bars):
            start = 0.0
            other = sum(us for name, us in bar.kernels if name not in colors) + (bar.other_us or 0.0)
            for name, us in [(n, us) for n, us in bar.kernels if n in colors] + [("other kernels", other)]:
                if us > 0:
                    ax.barh(y, us, left=start, height=0.6, color=colors.get(name, "#c8c8c8"), edgecolor="white",
                            linewidth=0.5)
                    start += us
            if bar.timed_us is not None:
                ax.plot([bar.timed_us], [y], marker="|", color="black", markersize=14, markeredgewidth=2)
        ax.set_yticks(range(len(bars)), [bar.label for bar in bars])
        ax.set_ylim(len(bars) - 0.5, -0.5)
        ax.set_xlim(0, None)
        ax.set_xlabel("µs per call")
        ax.grid(axis="y", visible=False)
        handles = [Line2D([], [], color=colors[name], linewidth=6, label=name) for name in named]
        handles += [Line2D([], [], color="#c8c8c8", linewidth=6, label="other kernels"),
                    Line2D([], [], color="black", marker="|", linestyle="none", markersize=10, markeredgewidth=2,
                           label="timed time per call")]
        _legend(fig, handles, columns=2)
    return fig


def scatter(title: str, points: list[Points], palette: Palette, xlabel: str, ylabel: str) -> Figure:
    """One log-log panel of points, one marker style per label."""
    with rc_context(STYLE):
        fig, grid = _panel_figure(1, 1, len(points), title)
        ax = grid[0][0]
        for p in points:
            style = palette[p.label]
            ax.plot(p.x, p.y, linestyle="none", marker=style.marker, color=style.color, markersize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(number))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        _legend(fig, [Line2D([], [], color=palette[p.label].color, marker=palette[p.label].marker,
                             linestyle="none", label=p.label) for p in points])
    return fig


def state_accuracy(title: str, series: list[Series], palette: Palette, chance: float | None = None) -> Figure:
    """Accuracy (linear, 0..1) against state size (log 2) per method: the DSF protocol's figure. One line per
    label through its points in order of state size; ``chance`` draws a dashed line."""
    with rc_context(STYLE):
        # one panel: a legend of 2 columns (4 would overflow its width); room for twice the rows
        fig, grid = _panel_figure(1, 1, 2 * len(series), title)
        ax = grid[0][0]
        xs = []
        for s in series:
            style = palette[s.label]
            order = np.argsort(s.x)
            ax.plot(s.x[order], s.y[order], color=style.color, marker=style.marker, linestyle=style.dash)
            xs.extend(s.x)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(number))
        ax.xaxis.set_minor_locator(NullLocator())
        if xs:
            lo, hi = min(xs), max(xs)
            ax.set_xlim(lo / 1.4, hi * 1.4)
            ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi, 2)))
        ax.set_ylim(-0.02, 1.02)
        if chance is not None:
            ax.axhline(chance, color="0.35", linestyle="--", linewidth=1)
            ax.text(0.02, chance, "chance", transform=ax.get_yaxis_transform(), fontsize=7, color="0.35",
                    va="bottom")
        ax.set_xlabel("state per layer (numbers per sequence)")
        ax.set_ylabel("accuracy")
        _legend(fig, [Line2D([], [], color=palette[s.label].color, marker=palette[s.label].marker,
                             linestyle=palette[s.label].dash, label=s.label) for s in series], columns=2)
    return fig
