"""How values read in a report: measured numbers, env.json values, file-name slugs."""
from __future__ import annotations

import math
import re

import pandas as pd

NOT_RECORDED = "not recorded"


def fmt(value, digits: int = 3) -> str:
    """A measured number in `digits` significant digits; empty for not measured."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value is pd.NA:
        return ""
    value = float(value)
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def shown(value) -> str:
    """An env.json value for display; missing or empty is "not recorded"."""
    if value is None or value == "" or value == [] or value == {}:
        return NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def slug(text: str) -> str:
    """A file stem from a title: lower case, runs of other characters as one dash, at most 80 characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "plot"
