"""The report's "Where the time goes" section (timing.profile_calls: profile_top, profile_kernels, profile_launches):
present only with profiled ok rows, methods fastest first, values read from the fixture's own strings, a
malformed profile_top shown as recorded."""
from __future__ import annotations

import pytest
from runfixtures import env_for, make_row, write_run

from attnbench.record.rundir import load_run
from attnbench.report import document as report
from attnbench.report.context import build_context
from attnbench.report.formatting import fmt
from attnbench.report.model import Cell, Plot, Table
from attnbench.report.render_html import render_html
from attnbench.report.render_md import render_markdown
from attnbench.report.sections import SECTIONS, profile

GROUP = "causal · causal_self · fwd · b1 · h16/16 · d128 · bf16"
# method -> (timed ms, profile_top, distinct kernels, launches per call); given out of time order on purpose
PROFILED = {
    "slow_chunked": (0.9, "chunk_fwd_o=100us (40%);chunk|state=80us (32%);cumsum=40us (16%);fill=20us (8%);"
                          "copy=5us (2%);mul=4us (2%)", 20, 150.0),
    "sdpa": (0.4, "flash_fwd_kernel=300us (86%);elementwise_kernel=50us (14%)", 2, 2.0),
    "mid": (0.6, "gemm=500us (100%)", 1, 1.0),
}
BROKEN = "flash_fwd_kernel 300us (86%)"  # "=" missing


def profiled_rows(run_id: str, broken: bool = True, columns: bool = True) -> list[dict]:
    """Three profiled methods at 32k (and unprofiled at 16k), one with a malformed profile_top, one oom.
    ``columns=False``: the same rows without any profile column."""
    rows = []
    for method, (ms, top, kernels, launches) in PROFILED.items():
        extra = dict(profile_top=top, profile_kernels=kernels, profile_launches=launches) if columns else {}
        rows.append(make_row(run_id, method, "causal", "fwd", 32768, ms=ms, **extra))
        rows.append(make_row(run_id, method, "causal", "fwd", 16384, ms=ms / 4))
    if broken:
        extra = dict(profile_top=BROKEN, profile_kernels=3, profile_launches=3.0) if columns else {}
        rows.append(make_row(run_id, "broken", "causal", "fwd", 32768, ms=1.5, **extra))
    rows.append(make_row(run_id, "eager", "causal", "fwd", 32768, "oom"))
    return rows


def section_of(rows, tmp_path, name="p"):
    return profile.section_profile(build_context([load_run(write_run(tmp_path, name, rows, env_for(name)))]))


def text_of(cell):
    return cell.text if isinstance(cell, Cell) else cell


def the_table(section) -> Table:
    tables = [b for b in section.blocks if isinstance(b, Table)]
    assert len(tables) == 1, [t.caption for t in tables]  # 32k only: 16k was not profiled
    return tables[0]


def expected_top(top: str, distinct: int) -> str:
    """The cell recomputed from the recorded string: the 4 largest as "name µs (share%)", then how many more."""
    entries = [entry.rsplit("=", 1) for entry in top.split(";")]
    parts = [f"{name} {fmt(float(us.split('us')[0]))} µs ({us.split('(')[1].rstrip(')')})" for name, us in entries[:4]]
    if distinct > 4:
        rest = 100 - sum(float(us.split("(")[1].rstrip("%)")) for _, us in entries[:4])
        parts.append(f"+{distinct - 4} more (≈{rest:.0f}%)")
    return " · ".join(parts)


def test_methods_fastest_first_with_their_recorded_values(tmp_path):
    table = the_table(section_of(profiled_rows("p"), tmp_path))
    assert GROUP in table.caption and "32k" in table.caption
    lines = {row[0]: dict(zip(table.header, map(text_of, row))) for row in table.rows}
    order = [row[0] for row in table.rows]
    ok_order = sorted(PROFILED, key=lambda m: PROFILED[m][0]) + ["broken"]  # broken's 1.5 ms is the slowest
    assert order == [*ok_order, "eager"]  # the oom row last, as its status
    for method, (ms, top, kernels, launches) in PROFILED.items():
        line = lines[method]
        assert line["ms per call (timed)"] == fmt(ms)
        assert line["launches per call"] == fmt(launches) and line["distinct kernels"] == str(kernels)
        assert line["largest kernels: µs per call (share of summed kernel time)"] == expected_top(top, kernels)
        first_us, first_share = top.split(";")[0].split("=")[1].split("us (")
        assert line["kernel ms per call (profiled)"] == f"≈{fmt(float(first_us) / float(first_share[:-2]) / 10, 2)}"
    assert lines["slow_chunked"]["largest kernels: µs per call (share of summed kernel time)"].count(" µs ") == 4
    assert lines["eager"]["ms per call (timed)"] == "oom"


def test_a_malformed_profile_top_is_shown_raw_and_the_report_still_writes(tmp_path):
    rows = profiled_rows("p")
    rows.append(make_row("p", "half_broken", "causal", "fwd", 32768, ms=2.0, profile_kernels=2, profile_launches=2.0,
                         profile_top="gemm=10us (50%);softmax 10us (50%)"))  # the second entry lacks "="
    section = section_of(rows, tmp_path)
    lines = {row[0]: row for row in the_table(section).rows}
    for method, raw in (("broken", BROKEN), ("half_broken", "gemm=10us (50%);softmax 10us (50%)")):
        cell = lines[method][-1]
        assert isinstance(cell, Cell) and cell.text == raw and "shown as recorded" in cell.title
        assert text_of(lines[method][2]) == ""  # no summed time from an unreadable string
    # negative control for the parser itself: the well-formed strings parse, the broken ones do not
    assert profile.parse_top(PROFILED["sdpa"][1]) == [profile.Kernel("flash_fwd_kernel", 300.0, 86.0),
                                                       profile.Kernel("elementwise_kernel", 50.0, 14.0)]
    assert profile.parse_top("a::b=1.234e+04us (97%);k:v=2us (0%)") == [profile.Kernel("a::b", 12340.0, 97.0),
                                                                         profile.Kernel("k:v", 2.0, 0.0)]
    for bad in (BROKEN, "a=1.2.3us (5%)", "a=12us", "a=12us (x%)", ""):
        assert profile.parse_top(bad) is None, bad
    # the whole report (both renderers) writes with the broken rows in it; the section follows the scaling one
    folder = write_run(tmp_path, "full", rows, env_for("full"))
    sections = report.build_report([load_run(folder)])
    anchors = [s.anchor for s in sections]
    assert anchors[anchors.index("scaling") + 1] == "profile"
    markdown, _ = report.write_report(sections, folder, "t")
    assert BROKEN in markdown.read_text()


def test_the_figure_stacks_the_four_largest_kernels_and_the_rest(tmp_path, monkeypatch):
    drawn = []

    def capture(title, bars):
        drawn.append(bars)
        return real(title, bars)

    real = profile.plots.kernel_bars
    monkeypatch.setattr(profile.plots, "kernel_bars", capture)
    section = section_of(profiled_rows("p"), tmp_path)
    assert len([b for b in section.blocks if isinstance(b, Plot)]) == 1 and len(drawn) == 1
    bars = {bar.label: bar for bar in drawn[0]}
    assert [bar.label for bar in drawn[0]] == sorted(PROFILED, key=lambda m: PROFILED[m][0])  # broken: no bar
    chunked = bars["slow_chunked"]
    assert [name for name, _ in chunked.kernels] == ["chunk_fwd_o", "chunk|state", "cumsum", "fill"]
    assert chunked.other_us == pytest.approx(100 / 0.40 - (100 + 80 + 40 + 20))
    assert chunked.timed_us == pytest.approx(900)
    assert bars["mid"].other_us == pytest.approx(0)


def test_pipes_in_kernel_names_are_escaped_in_markdown_and_html_holds_the_section(tmp_path):
    section = section_of(profiled_rows("p"), tmp_path)
    for block in section.blocks:
        if isinstance(block, Plot):
            block.png = b""  # the renderers only reference it (Markdown) or embed it (HTML)
    markdown = render_markdown("t", [section], "files")
    line = next(line for line in markdown.splitlines() if line.startswith("| slow_chunked "))
    assert "chunk\\|state" in line and line.count(" | ") == 5  # six cells: the name's pipe is not a column
    page = render_html("t", [section])
    assert 'id="profile"' in page and "Where the time goes" in page and "chunk|state" in page


def test_absent_without_profile_columns_and_the_report_is_unchanged(tmp_path, monkeypatch):
    without = load_run(write_run(tmp_path, "plain", profiled_rows("plain", columns=False), env_for("plain")))
    sections = report.build_report([without])
    assert "profile" not in [s.anchor for s in sections] and "scaling" in [s.anchor for s in sections]
    # the run without the columns reads exactly as it did before the section existed
    monkeypatch.setattr(report, "SECTIONS", tuple(s for s in SECTIONS if s is not profile.section_profile))
    assert render_markdown("t", report.build_report([without]), "files") == render_markdown("t", sections, "files")


def test_absent_when_only_failed_rows_carry_a_profile(tmp_path):
    rows = profiled_rows("p", columns=False)
    rows.append(make_row("p", "late", "causal", "fwd", 32768, "error", profile_top="gemm=1us (100%)"))
    assert section_of(rows, tmp_path) is None


def test_a_recorded_kernel_time_is_shown_exactly_not_derived(tmp_path):
    """Rows with profile_kernel_ms (bench/measure/profile.py since it records it): the table shows that value,
    without the ≈ of the share-derived estimate."""
    rows = profiled_rows("p", broken=False)
    for row in rows:
        if row["method"] == "sdpa" and "profile_top" in row:
            row["profile_kernel_ms"] = 0.3612
    table = the_table(section_of(rows, tmp_path))
    lines = {row[0]: dict(zip(table.header, map(text_of, row))) for row in table.rows}
    assert lines["sdpa"]["kernel ms per call (profiled)"] == fmt(0.3612, 2)
    assert lines["mid"]["kernel ms per call (profiled)"].startswith("≈")  # no recorded value: derived
