"""The report as one self-contained HTML page, from the jinja2 template ``templates/report.html.j2``.

CSS and scripts are inline in the template, figures are data: URIs; nothing is fetched from anywhere. Every
value is escaped by the template (autoescape); the renderer only hands it the model and two helpers.
"""
from __future__ import annotations

import base64
from functools import cache

import jinja2

from attnbench.report import plots
from attnbench.report.model import Cell, Section

TEMPLATE = "report.html.j2"


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's header."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _base64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _is_cell(value) -> bool:
    return isinstance(value, Cell)


def _unknown_block(block) -> str:
    raise TypeError(f"report block of unknown kind: {block!r} (the template draws text, code, plot, table)")


@cache
def environment() -> jinja2.Environment:
    """The template environment: package templates, autoescape on, no stray whitespace from block tags."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("attnbench.report", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
                             undefined=jinja2.StrictUndefined)
    env.filters["base64"] = _base64
    env.globals["png_size"] = png_size
    env.globals["unknown_block"] = _unknown_block
    env.tests["cell"] = _is_cell
    return env


def render_html(title: str, sections: list[Section]) -> str:
    """One self-contained page: CSS inline, figures as data: URIs, nothing fetched from anywhere."""
    return environment().get_template(TEMPLATE).render(title=title, sections=sections,
                                                       status_colors=plots.STATUS_COLORS)
