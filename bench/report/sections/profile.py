"""Where the time goes: the profiled kernels of each method (``timing.profile_calls``, bench/measure/profile.py).

Only for runs whose rows carry ``profile_top``; per figure group and profiled length, one table with a line per
method (fastest first): its timed ms per call, the summed kernel time, launches and distinct kernels of a profiled
call, and its largest kernels with µs per call and share; then a stacked bar figure of the same kernels.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from attnbench.report import plots
from attnbench.report.context import Context, in_group_order
from attnbench.report.formatting import fmt
from attnbench.report.model import Cell, Section, Table, Text, plot, status_cell

SHOWN = 4  # kernels named per method; the rest are counted
# one entry of profile_top as bench/measure/profile.py writes it: "name=<µs per call>us (<share>%)"
ENTRY = re.compile(r"^(?P<name>.+)=(?P<us>[0-9.]+(?:[eE][-+]?[0-9]+)?)us \((?P<share>[0-9.]+)%\)$")
MALFORMED = "not in the form name=<µs>us (<share>%) of bench/measure/profile.py: shown as recorded"


@dataclass(frozen=True)
class Kernel:
    """One kernel of ``profile_top``: shortened name, device µs per call, share (%) of the summed kernel time."""

    name: str
    us: float
    share: float


def parse_top(text: str) -> list[Kernel] | None:
    """The kernels of a ``profile_top`` string, largest first as recorded; None when any entry is malformed."""
    kernels = []
    for entry in text.split(";"):
        match = ENTRY.match(entry.strip())
        if match is None:
            return None
        try:
            kernels.append(Kernel(match["name"].strip(), float(match["us"]), float(match["share"])))
        except ValueError:  # e.g. "1.2.3us": the pattern admits it, float() does not
            return None
    return kernels


def summed_us(kernels: list[Kernel]) -> float | None:
    """The summed kernel time of a call (µs), from the kernel with the largest share (µs / share); None without a
    share. Shares are recorded as whole percents, so this is approximate (within 1 % for a share >= 50 %)."""
    largest = max(kernels, key=lambda k: k.share, default=None)
    if largest is None or largest.share <= 0:
        return None
    return largest.us * 100 / largest.share


def _total_us(row, kernels: list[Kernel]) -> float | None:
    """The call's summed kernel µs: the recorded ``profile_kernel_ms`` where the row has it, else derived from the
    shares (:func:`summed_us`, rows written before that column existed)."""
    recorded = row.get("profile_kernel_ms")
    return float(recorded) * 1000 if pd.notna(recorded) else summed_us(kernels)


def top_text(kernels: list[Kernel], distinct) -> str:
    """"name 300 µs (86%) · name 50 µs (14%)", the largest ``SHOWN``, then how many more kernels the call ran."""
    shown = kernels[:SHOWN]
    parts = [f"{k.name} {fmt(k.us)} µs ({k.share:.0f}%)" for k in shown]
    more = int(distinct) - len(shown) if pd.notna(distinct) else len(kernels) - len(shown)
    if more > 0:
        rest = 100 - sum(k.share for k in shown)
        parts.append(f"+{more} more" + (f" (≈{rest:.0f}%)" if rest >= 1 else ""))
    return " · ".join(parts)


def profile_cells(row) -> list:
    """Summed kernel ms, launches, distinct kernels and the largest kernels of one ok row."""
    launches = fmt(row["profile_launches"]) if pd.notna(row["profile_launches"]) else ""
    distinct = str(int(row["profile_kernels"])) if pd.notna(row["profile_kernels"]) else ""
    top = row["profile_top"]
    if pd.isna(top) or not str(top).strip():
        profiled = pd.notna(row["profile_kernels"]) or pd.notna(row["profile_launches"])
        return ["", launches, distinct, "no kernel time recorded" if profiled else "not profiled"]
    kernels = parse_top(str(top))
    if kernels is None:
        return ["", launches, distinct, Cell(str(top), None, MALFORMED)]
    total = _total_us(row, kernels)
    exact = pd.notna(row.get("profile_kernel_ms"))
    return [("" if exact else "≈") + fmt(total / 1000, 2) if total is not None else "", launches, distinct,
            top_text(kernels, row["profile_kernels"])]


HEADER = ["method", "ms per call (timed)", "kernel ms per call (profiled)", "launches per call", "distinct kernels",
          "largest kernels: µs per call (share of summed kernel time)"]


def profile_blocks(rows: pd.DataFrame, where: str) -> list:
    """The table of one (group, source, length), one line per method (ok rows fastest first, then the others by
    name), and a figure of the profiled kernels of its ok rows (none when no ok row's kernels could be read)."""
    rows = rows.drop_duplicates("label", keep="last")
    ok = rows[(rows["status"] == "ok") & rows["ms_median"].notna()].sort_values(["ms_median", "label"])
    others = rows.drop(ok.index).sort_values("label")
    table = [[row["label"], fmt(row["ms_median"]), *profile_cells(row)] for _, row in ok.iterrows()]
    table += [[row["label"], status_cell(row), "", "", "", ""] for _, row in others.iterrows()]
    blocks: list = [Table(list(HEADER), table, f"Where the time goes, {where}.")]
    bars = []
    for _, row in ok.iterrows():
        kernels = parse_top(str(row["profile_top"])) if pd.notna(row["profile_top"]) else None
        if not kernels:
            continue
        shown, total = kernels[:SHOWN], _total_us(row, kernels)
        other = None if total is None else max(total - sum(k.us for k in shown), 0.0)
        bars.append(plots.KernelBar(row["label"], [(k.name, k.us) for k in shown], other, row["ms_median"] * 1000))
    if bars:
        blocks.append(plot(
            f"profile-{where}", f"largest kernels per call, {where}",
            f"Each bar is a method's summed kernel time per profiled call, split into its {SHOWN} largest kernels "
            "and the rest (other kernels); the black tick is its timed time per call. A tick far right of its bar: "
            "the GPU waits between kernels (launch-bound). Methods whose kernels were not recorded have no bar.",
            plots.kernel_bars, f"Where the time goes, {where}", bars))
    return blocks


def section_profile(ctx: Context) -> Section | None:
    """Per (mask · pattern · mode · shape, source, length) with a profiled ok row, a table of each method's
    kernels; None when no ok row carries ``profile_top`` (runs without ``timing.profile_calls``)."""
    rows = ctx.rows
    if "profile_top" not in rows or rows.empty:
        return None
    rows = rows[rows["kind"] == "kernel"]
    for column in ("profile_kernels", "profile_launches", "profile_kernel_ms"):
        rows = rows.assign(**{column: pd.to_numeric(rows[column], errors="coerce") if column in rows else pd.NA})
    top = rows["profile_top"]
    profiled = (rows["status"] == "ok") & top.notna() & (top.astype(str).str.strip() != "")
    if not profiled.any():
        return None
    section = Section("profile", "Where the time goes")
    section.blocks.append(Text(
        "After the timed calls, timing.profile_calls more calls of each case ran under torch.profiler: the "
        "profiled calls are not the timed ones, so ms per call carries none of the profiler's overhead. Per "
        "call: the kernel launches, the distinct kernels and the largest kernels with their device µs; a share "
        "is of the summed kernel time, not of the wall time (gaps between launches are in neither; kernels on "
        "several streams may overlap). The summed kernel time is recorded (profile_kernel_ms); for rows "
        "without it, derived from the largest kernel's share (whole percents: marked ≈). Many launches of small kernels, and a summed kernel time "
        "well below the timed ms, mean the method is launch-bound: the host, not the GPU's arithmetic, sets its "
        "time. Kernel names are shortened (templates and arguments dropped); on a CPU run the 'kernels' are "
        "top-level operators."))
    keys = set(zip(rows.loc[profiled, "group"], rows.loc[profiled, "source"], rows.loc[profiled, "x"]))
    for (group, source), in_group in in_group_order(rows):
        for x in sorted(set(in_group["x"].dropna())):
            if (group, source, x) not in keys:
                continue
            where = group + (f" · {source}" if source else "") + f" at {plots.tokens(x)}"
            section.blocks.extend(profile_blocks(in_group[in_group["x"] == x], where))
    return section
