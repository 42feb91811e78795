"""The report model: a report is a list of ``Section``s, each a list of blocks (Text, Code, Table, Plot).

Sections build these blocks from rows; the renderers (``render_md``, ``render_html``) only lay them out. Each
block class names its ``kind`` so that the HTML template can choose the markup without Python type checks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from matplotlib.figure import Figure

from attnbench.report import plots
from attnbench.report.formatting import slug


@dataclass
class Text:
    """A paragraph of plain text."""

    text: str
    kind: ClassVar[str] = "text"


@dataclass
class Code:
    """Preformatted text, shown verbatim (e.g. the command of a run)."""

    text: str
    kind: ClassVar[str] = "code"


@dataclass
class Cell:
    """A table cell; ``status`` colours it, ``title`` is shown on hover (HTML)."""

    text: str
    status: str | None = None
    title: str | None = None


@dataclass
class Table:
    """Rows of cells (str or Cell) under ``header``; ``collapsed`` folds it behind its caption (<details>)."""

    header: list[str]
    rows: list[list]
    caption: str = ""
    collapsed: bool = False
    kind: ClassVar[str] = "table"


@dataclass
class Plot:
    """A rendered figure; ``name`` is its file stem under report_files/."""

    name: str
    alt: str
    caption: str
    png: bytes
    kind: ClassVar[str] = "plot"


@dataclass
class Section:
    """One report section: ``anchor`` is its id in both reports (and the table of contents)."""

    anchor: str
    title: str
    blocks: list = field(default_factory=list)


def status_cell(row) -> Cell:
    """The status of a row as a coloured cell, its reason on hover."""
    return Cell(row["status"], row["status"], row["reason"] or None)


def plot(name: str, alt: str, caption: str, builder: Callable[..., Figure], *args, **kwargs) -> Plot:
    """Render ``builder(*args, **kwargs)`` (a figure of ``attnbench.report.plots``) to a Plot."""
    return Plot(slug(name), alt, caption, plots.to_png(builder(*args, **kwargs)))
