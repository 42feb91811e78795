"""`attnbench report RUN [RUN ...]`: a report that answers "which method is fastest, leanest and still right?".

Writes ``report.md`` (figures as ``report_files/*.png`` next to it) and a self-contained ``report.html``
(figures embedded as base64 PNG, CSS inline, no external URL) into the first run folder, or into ``--out``.
Several runs merge into one report; lines are labelled by method and, when runs differ, by device or run.

The report is the list ``attnbench.report.sections.SECTIONS`` of functions ``section_x(ctx) -> Section | None``
(None: the section does not apply, e.g. no approx_err measured); adding a section is adding one module there.
Only measured values are shown as values: failed cases appear as markers, status words or table entries.

Layout of the package: ``context`` prepares the rows once (``Context``), ``sections/`` turn them into the
report model (``model``: Section, Text, Code, Table, Cell, Plot) with the help of ``maths``, ``tables``,
``formatting`` and ``plots``; ``render_md`` and ``render_html`` (a jinja2 template under ``templates/``) lay the
model out; this module ties them together and is the command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnbench.record.rundir import Run, UsageError, load_runs, parse_args
from attnbench.report.context import build_context
from attnbench.report.maths import SLOPE_FIT_FROM, describe_crossing, efficiency_length, pareto_front
from attnbench.report.model import Cell, Code, Plot, Section, Table, Text
from attnbench.report.render_html import render_html
from attnbench.report.render_md import render_markdown
from attnbench.report.sections import QUALITY_ONLY, SECTIONS

# the report model and maths, importable from the command's module as before the split
__all__ = ["Cell", "Code", "Plot", "Section", "Table", "Text", "build_report", "describe_crossing",
           "efficiency_length", "main", "pareto_front", "write_report"]


def build_report(runs: list[Run], baseline: str | None = None, slope_from: int = SLOPE_FIT_FROM,
                 one_source: bool = False) -> list[Section]:
    """Every section that applies to these runs, in report order (runs with quality rows only: the quality
    section and the environment). ``slope_from``: shortest length (tokens) of the scaling slope fits."""
    if not any(len(run.rows) for run in runs):
        import pandas as pd

        from attnbench.report import plots
        from attnbench.report.context import Context

        ctx = Context(runs, pd.DataFrame(), pd.DataFrame(), baseline, plots.Palette([]))
        return [s for s in (section(ctx) for section in QUALITY_ONLY) if s is not None]
    ctx = build_context(runs, baseline, slope_from, one_source)
    return [s for s in (section(ctx) for section in SECTIONS) if s is not None]


def write_report(sections: list[Section], out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write report.md, report_files/*.png and report.html into ``out_dir``; returns the two report paths."""
    files = out_dir / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    for stale in files.glob("*.png"):
        stale.unlink()
    used: set[str] = set()
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Plot):
                name, n = block.name, 1
                while name in used:
                    n += 1
                    name = f"{block.name}-{n}"
                block.name = name
                used.add(name)
                (files / f"{name}.png").write_bytes(block.png)
    markdown, page = out_dir / "report.md", out_dir / "report.html"
    markdown.write_text(render_markdown(title, sections, files.name))
    page.write_text(render_html(title, sections))
    return markdown, page


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="attnbench report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder, or run id under --results-dir")
    parser.add_argument("--out", type=Path, help="folder for the report (default: the first run folder)")
    parser.add_argument("--baseline", metavar="METHOD",
                        help="method to compare against (default: the fastest exact method per case)")
    parser.add_argument("--slope-from", type=int, default=SLOPE_FIT_FROM, metavar="TOKENS",
                        help="shortest length of the scaling section's slope fits (default: %(default)s; fewer "
                             "than 3 lengths at or above it: the longest 3)")
    parser.add_argument("--one-source", action="store_true",
                        help="the runs are one comparison (e.g. one run per implementation of a method): no "
                             "per-run tables; a method measured with several method_options is labelled with them")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="where run ids are looked up")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    try:
        if args.slope_from < 1:
            raise UsageError(f"--slope-from {args.slope_from}: a length in tokens, at least 1")
        runs = load_runs(args.runs, args.results_dir)
        from attnbench.record.quality import load_quality

        if not any(len(run.rows) or len(load_quality(run.path)) for run in runs):
            raise UsageError(f"RUN: no rows in {', '.join(str(run.path) for run in runs)}")
        methods = sorted(set().union(*(set(run.rows["method"].dropna()) for run in runs)))
        if args.baseline and args.baseline not in methods:
            raise UsageError(f"--baseline {args.baseline!r}: no such method in these runs "
                             f"(methods: {', '.join(methods)})")
        sections = build_report(runs, args.baseline, args.slope_from, args.one_source)
        title = "attnbench report: " + ", ".join(run.name for run in runs)
        markdown, page = write_report(sections, args.out or runs[0].path, title)
    except UsageError as exc:
        print(f"attnbench report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {markdown}\nwrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
