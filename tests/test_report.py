"""`attnbench report`: sections, plots, the capability matrix, speed-up, efficiency length, merging, errors."""
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from runfixtures import H200, LENGTHS, env_for, fixture_rows, make_row, model_ms, write_fixture_run, write_run

from attnbench.record.rundir import load_run
from attnbench.record.schema import STATUSES
from attnbench.report import document as report
from attnbench.report import plots
from attnbench.report.context import build_context, prepare_rows
from attnbench.report.document import Cell, Plot, Table, describe_crossing, efficiency_length, pareto_front
from attnbench.report.model import Text
from attnbench.report.sections.curves import series_of
from attnbench.report.sections.overview import margin_text

# every section but "pareto", which needs approx_err (tests/test_report_pareto.py)
ALL_SECTIONS = ["overview", "masks", "capability", "curves", "peak", "speedup", "efficiency-length", "scaling",
                "cp", "environment"]


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory):
    """The standard fixture run (every status, and CP rows) with its report written."""
    folder = write_fixture_run(tmp_path_factory.mktemp("runs"))
    assert report.main([str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def fixture_sections(fixture_report):
    """The sections of the fixture run's report (default baseline)."""
    return sections_of(fixture_report)


def sections_of(*folders, baseline=None):
    return {s.anchor: s for s in report.build_report([load_run(f) for f in folders], baseline)}


def tables(section, caption_part=""):
    return [b for b in section.blocks if isinstance(b, Table) and caption_part in b.caption]


def text_of(cell):
    return cell.text if isinstance(cell, Cell) else cell


# ------------------------------------------------------------------------------------- efficiency length
LENGTHS_SWEEP = 1024 * 2.0 ** np.arange(7)  # 1k .. 64k


def test_efficiency_length_of_two_power_laws_is_exact():
    # 1e-8 L^2 = 1e-4 L at L = 10,000: both are straight lines in log-log, so interpolation is exact
    crossing = efficiency_length(LENGTHS_SWEEP, 1e-4 * LENGTHS_SWEEP, 1e-8 * LENGTHS_SWEEP**2)
    assert crossing == pytest.approx(10_000, rel=1e-9)


def test_efficiency_length_with_launch_floors_is_close_to_the_true_root():
    method = 0.3 + 1e-5 * LENGTHS_SWEEP
    baseline = 0.02 + 1e-8 * LENGTHS_SWEEP**2
    true_root = max(np.roots([1e-8, -1e-5, 0.02 - 0.3]).real)
    crossing = efficiency_length(LENGTHS_SWEEP, method, baseline)
    assert 4096 < crossing < 8192
    assert crossing == pytest.approx(true_root, rel=0.05)


def test_efficiency_length_skips_unmeasured_lengths_and_accepts_equality():
    baseline = 1e-8 * LENGTHS_SWEEP**2
    method = 1e-4 * LENGTHS_SWEEP
    method[2] = np.nan  # 4k failed: the crossing is still bracketed by 2k and 8k... and 16k
    assert efficiency_length(LENGTHS_SWEEP, method, baseline) == pytest.approx(10_000, rel=1e-9)
    equal_at_4k = np.array([2.0, 1.5, 1.0, 0.5]), np.array([1.0, 1.0, 1.0, 1.0])
    assert efficiency_length([1024, 2048, 4096, 8192], *equal_at_4k) == pytest.approx(4096)


@pytest.mark.parametrize("method, words", [
    (lambda L: 2e-8 * L**2, "slower at every measured length"),
    (lambda L: 0.5e-8 * L**2, "at least as fast at every measured length"),
    (lambda L: 1e-12 * L**3, "at least as fast at short lengths only"),
])
def test_curves_that_never_cross_from_above(method, words):
    baseline = 1e-8 * LENGTHS_SWEEP**2
    assert efficiency_length(LENGTHS_SWEEP, method(LENGTHS_SWEEP), baseline) is None
    text = describe_crossing(LENGTHS_SWEEP, method(LENGTHS_SWEEP), baseline, "at least as fast", "slower")
    assert text == f"never within the measured range ({words})"


def test_describe_crossing_needs_two_common_lengths():
    assert "fewer than 2" in describe_crossing([1024, 2048], [1.0, np.nan], [1.0, 2.0], "a", "b")
    assert describe_crossing(LENGTHS_SWEEP, 1e-4 * LENGTHS_SWEEP, 1e-8 * LENGTHS_SWEEP**2, "a", "b") == "10,000 tokens"


def test_pareto_front_keeps_the_undominated_points():
    times, accuracy = [1.0, 2.0, 3.0, 4.0], [0.5, 0.9, 0.8, 0.95]
    assert pareto_front(times, accuracy, higher_is_better=True).tolist() == [True, True, False, True]
    assert pareto_front(times, [0.5, 0.4, 0.6, 0.1], higher_is_better=False).tolist() == [True, True, False, True]


# ------------------------------------------------------------------------------------- the written report
def test_every_section_is_in_both_reports(fixture_report):
    markdown = (fixture_report / "report.md").read_text()
    page = (fixture_report / "report.html").read_text()
    for anchor in ALL_SECTIONS:
        assert f'<a id="{anchor}"></a>' in markdown
        assert f'<section id="{anchor}">' in page
        assert f'href="#{anchor}"' in page  # table of contents
    assert 'id="pareto"' not in markdown and 'id="pareto"' not in page  # no approx_err in the fixture


def test_plots_are_written_non_empty_and_referenced(fixture_report):
    pngs = sorted((fixture_report / "report_files").glob("*.png"))
    markdown = (fixture_report / "report.md").read_text()
    page = (fixture_report / "report.html").read_text()
    referenced = re.findall(r"!\[[^\]]*\]\(report_files/([^)]+\.png)\)", markdown)
    assert sorted(referenced) == [p.name for p in pngs]
    assert page.count('<img class="plot"') == len(pngs)
    # the mask gallery, 6 (mask, mode) curve figures, roofline, speed-up summary, and of the CP rows: strong and
    # weak scaling, per-rank bars, bytes against time
    assert len(pngs) == 13
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = imread(png)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels[..., :3].std() > 0.05, f"{png.name} looks blank"


def test_html_is_self_contained(fixture_report):
    page = (fixture_report / "report.html").read_text()
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"://|\bsrc=\"//|url\(|\bwww\.", text, flags=re.IGNORECASE)
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', page))
    assert "<link" not in page and "@import" not in page


def test_capability_matrix_shows_every_status_with_reasons(fixture_report):
    page = (fixture_report / "report.html").read_text()
    capability = page[page.index('<section id="capability">'):page.index('<section id="curves">')]
    for status in STATUSES:
        assert f'class="st-{status}"' in capability
    assert 'title="oom ×2: CUDA out of memory: tried to allocate 16.00 GiB' in capability
    for reason in ("worker died: SIGSEGV", "case exceeded its 120 s timeout", "recompile limit hit",
                   "linear_attn supports only full and causal masks", "rel_err 0.31 above tolerance"):
        assert reason in capability  # footnote table


def test_failed_cases_are_shown_by_status_never_as_numbers(fixture_sections):
    sections = fixture_sections
    table = tables(sections["curves"], "full · noncausal_self · fwd")[0]
    row = {r[0]: r[1:] for r in table.rows}
    assert table.header == ["method", "1k", "2k", "4k", "8k", "16k"]
    assert [text_of(c) for c in row["eager"]] == [f"{model_ms('eager', L):.3g}" for L in LENGTHS[:4]] + ["oom"]
    assert text_of(row["flex"][-1]) == "error" and row["flex"][-1].title.startswith("RuntimeError")
    assert all(text_of(c) == "wrong" for c in row["buggy"])
    speedups = {r[0]: r[1:] for r in tables(sections["speedup"], "full · noncausal_self · fwd")[0].rows}
    assert text_of(speedups["eager"][-1]) == "oom"


def test_speedup_against_the_fastest_exact_method_per_case(fixture_sections):
    sections = fixture_sections
    table = tables(sections["speedup"], "full · noncausal_self · fwd")[0]
    row = {r[0]: r[1:] for r in table.rows}
    expected = model_ms("sdpa", 16384) / model_ms("linear_attn", 16384)
    assert row["linear_attn"][-1] == f"{expected:.3g}×"
    assert row["sdpa"][0] == "1×"
    assert "(baseline: sdpa)" in table.caption


def test_baseline_option_changes_the_reference(fixture_report):
    sections = sections_of(fixture_report, baseline="flex")
    row = {r[0]: r[1:] for r in tables(sections["speedup"], "full · noncausal_self · fwd")[0].rows}
    assert row["sdpa"][0] == f"{model_ms('flex', 1024) / model_ms('sdpa', 1024):.3g}×"
    assert text_of(row["sdpa"][-1]) == "no baseline"  # flex errored at 16k: no speed-up invented
    assert "the method flex" in sections["speedup"].blocks[0].text


def test_efficiency_length_table_reports_the_linear_crossing(fixture_sections):
    sections = fixture_sections
    rows = tables(sections["efficiency-length"])[0].rows
    linear = [r for r in rows if r[0].startswith("full · noncausal_self · fwd") and r[1] == "linear_attn"][0]
    crossing = efficiency_length(LENGTHS, [model_ms("linear_attn", L) for L in LENGTHS],
                                 [model_ms("sdpa", L) for L in LENGTHS])
    assert linear[2] == "sdpa" and linear[4] == f"{crossing:,.0f} tokens"
    assert 8192 < crossing < 16384
    flex = [r for r in rows if r[0].startswith("full · noncausal_self · fwd") and r[1] == "flex"][0]
    assert flex[4] == "never within the measured range (slower at every measured length)"


def test_overview_answers_who_is_fastest(fixture_sections):
    sections = fixture_sections
    answers = {r[0]: r for r in tables(sections["overview"], "who is fastest")[0].rows}
    full_fwd = answers["full · noncausal_self · fwd · b1 · h16/16 · d128 · bf16"]
    assert full_fwd[1] == "16k" and full_fwd[2].startswith("sdpa")
    assert full_fwd[3] == "only one"  # flex errs, eager runs out of memory, buggy is wrong at 16K
    assert full_fwd[4].startswith("linear_attn") and "approximate" in full_fwd[4]
    assert "flex (error)" in full_fwd[6] and "eager (oom)" in full_fwd[6]


def test_masks_section_draws_every_mask_it_can_rebuild_and_names_the_rest(fixture_sections):
    section = fixture_sections["masks"]
    pictures = [b for b in section.blocks if isinstance(b, Plot)]
    assert len(pictures) == 1 and pictures[0].png.startswith(b"\x89PNG")
    notes = " ".join(b.text for b in section.blocks if isinstance(b, Text))
    # the fixture's "sliding_window(w=256)" has no field w: named with the reason, never drawn
    assert "Not drawn" in notes and "sliding_window(w=256)" in notes and "MaskParamError" in notes


def test_mask_pictures_are_exact_fractions_at_the_largest_measured_shape(tmp_path, monkeypatch):
    from attnbench import masks as mask_library

    rows = [make_row("r", "sdpa", "causal", "fwd", n) for n in (256, 1024)]
    folder = write_run(tmp_path, "r", rows, env_for("r", H200, True))
    drawn = {}
    gallery = plots.mask_gallery

    def capture(title, tiles, columns=4):
        drawn.update({t.title: t for t in tiles})
        return gallery(title, tiles, columns)

    monkeypatch.setattr(plots, "mask_gallery", capture)
    sections_of(folder)
    tile = drawn["causal"]
    expected = mask_library.picture.mask_image(mask_library.make_mask("causal").bind(1024, 1024), 128).numpy()
    assert tile.image.shape == (128, 128) and (tile.image == expected).all()
    assert tile.caption.startswith("1k × 1k")


def test_margin_over_the_runner_up_respects_the_spread():
    def ranked(*rows):
        return pd.DataFrame(rows, columns=["method", "ms_median", "ms_p20", "ms_p80"]).sort_values("ms_median")

    clear = ranked(("flex", 2.0, 1.9, 2.1), ("sdpa_cudnn", 5.0, 4.9, 5.2), ("eager", 9.0, 8.0, 10.0))
    assert margin_text(clear) == "2.50× over sdpa_cudnn"
    close = ranked(("flex", 2.0, 1.9, 2.2), ("sdpa_cudnn", 2.1, 2.15, 2.3))
    assert margin_text(close) == "within spread of sdpa_cudnn (1.05×)"
    assert margin_text(ranked(("flex", 2.0, 1.9, 2.1))) == "only one"


def small_rows(run_id, device=H200):
    """One mask and mode of the fixture (one curve figure), without CP rows."""
    return fixture_rows(run_id, device, cp=False, masks=("full",), modes=("fwd",))


def write_small_run(root, run_id, device=H200, calibration=True):
    return write_run(root, run_id, small_rows(run_id, device), env_for(run_id, device, calibration))


def test_without_calibration_or_environment_nothing_is_invented(tmp_path):
    folder = write_run(tmp_path, "bare", small_rows("bare"))
    assert report.main([str(folder)]) == 0
    markdown = (folder / "report.md").read_text()
    assert "no calibration recorded for this device" in markdown
    assert not list((folder / "report_files").glob("roofline*"))
    assert "measured bf16 matmul peak" not in markdown
    assert "| torch | not recorded |" in markdown and "| GPU" not in markdown
    assert "Approximation error against speed" not in markdown and "context-parallel layout" not in markdown
    environment = markdown[markdown.index('<a id="environment">'):]
    assert "```\nnot recorded\n```" in environment  # the command


def test_environment_shows_versions_clocks_and_the_command(fixture_report):
    markdown = (fixture_report / "report.md").read_text()
    environment = markdown[markdown.index('<a id="environment">'):]
    for text in ("| driver | 580.65 |", "| CUDA | 13.0 |", "| triton | 3.6.0 |", "| git SHA | abc1234 |",
                 "| 0 | NVIDIA H200 | 143771 | 1980 | 2619 | 700 |", "1,980 MHz SM clock",
                 "attnbench sweep=fixture run_id=fixture-run", "bf16 matmul 780 TFLOP/s"):
        assert text in environment


def test_merging_two_runs_labels_lines_by_device(tmp_path):
    first = write_small_run(tmp_path, "h200-run")
    second = write_small_run(tmp_path, "b200-run", "NVIDIA B200", calibration=False)
    out = tmp_path / "merged"
    assert report.main([str(first), str(second), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "sdpa · NVIDIA H200" in markdown and "sdpa · NVIDIA B200" in markdown
    assert "NVIDIA B200 (run b200-run): no calibration recorded" in markdown
    assert "| field | h200-run |" in markdown and "| field | b200-run |" in markdown
    assert not (first / "report.md").exists()
    runs_table = markdown[markdown.index("| run | device |"):].splitlines()
    assert runs_table[2].startswith("| h200-run | NVIDIA H200 |") and runs_table[3].startswith("| b200-run |")


def test_merged_report_defaults_to_the_first_run_folder(tmp_path):
    first = write_small_run(tmp_path, "a")
    second = write_small_run(tmp_path, "b")
    assert report.main([str(first), str(second)]) == 0
    assert "sdpa · a" in (first / "report.md").read_text()
    assert not (second / "report.md").exists()


def test_rerunning_replaces_old_figures(tmp_path):
    folder = write_small_run(tmp_path, "again")
    stale = folder / "report_files" / "stale.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    assert report.main([str(folder)]) == 0
    assert not stale.exists() and len(list(stale.parent.glob("*.png"))) == 4  # masks, curves, speed-up, roofline


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "run folder not found"),
    (["{run}", "--baseline", "nosuch"], "--baseline 'nosuch': no such method"),
    (["{empty}"], "no rows"),
    ([], "the following arguments are required: RUN"),
])
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, capsys, argv, message):
    run = write_run(tmp_path, "run", small_rows("run")[:5])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "env.json").write_text("{}")
    paths = {"missing": tmp_path / "missing", "run": run, "empty": tmp_path / "empty"}
    assert report.main([a.format(**paths) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_run_ids_resolve_under_results_dir(tmp_path):
    write_small_run(tmp_path, "by-id")
    assert report.main(["by-id", "--results-dir", str(tmp_path)]) == 0
    assert (tmp_path / "by-id" / "report.html").exists()


def test_plots_are_plot_blocks_per_section(fixture_sections):
    sections = fixture_sections
    plots_by_section = {a: [b for b in s.blocks if isinstance(b, Plot)] for a, s in sections.items()}
    assert len(plots_by_section["curves"]) == 6
    assert [p.name for p in plots_by_section["peak"]] == ["roofline-fixture-run"]
    assert len(plots_by_section["masks"]) == len(plots_by_section["speedup"]) == 1


def test_context_parallel_rows_are_named_and_kept_out_of_the_single_device_curves(fixture_report, fixture_sections):
    overview = " ".join(b.text for b in fixture_sections["overview"].blocks if isinstance(b, Text))
    assert "6 case(s) ran on a context-parallel layout (ring, ulysses)" in overview
    ctx = build_context([load_run(fixture_report)])
    assert (ctx.rows["layout"] != "single").sum() == 6
    assert (ctx.kernel["layout"] == "single").all() and (ctx.kernel["world_size"] == 1).all()
    at_64k = ctx.kernel[ctx.kernel["x"] == 65536]
    assert at_64k["ms_median"].tolist() == [model_ms("sdpa", 65536)]  # the one single-device row at 64k
    matrix = tables(fixture_sections["capability"], "Status of every case")[0]
    assert "causal · causal_self · ring" in matrix.header and "causal · causal_self · ulysses" in matrix.header


def test_plot_series_carry_failed_cases_as_markers_not_values(fixture_report):
    rows = prepare_rows([load_run(fixture_report)])
    group = "full · noncausal_self · bwd · b1 · h16/16 · d128 · bf16"
    eager = rows[(rows["label"] == "eager") & (rows["group"] == group)]
    series = series_of(eager.sort_values("x"), "eager", "ms_median", ("ms_p20", "ms_p80"))
    assert series.x.tolist() == [1024, 2048, 4096]
    assert series.failed == [(8192, "timeout"), (16384, "oom")]
    assert series.y.tolist() == [model_ms("eager", L, "bwd") for L in (1024, 2048, 4096)]
    assert series.low is not None and (series.low < series.y).all()


def test_a_run_where_nothing_was_measured(tmp_path):
    rows = [make_row("failed", m, "causal", "fwd", L, "error", reason="boom") for m in ("sdpa", "flex")
            for L in (1024, 2048)]
    folder = write_run(tmp_path, "failed", rows, {"gpus": "not a list", "calibration": "bogus", "device": None})
    assert report.main([str(folder)]) == 0
    markdown = (folder / "report.md").read_text()
    assert "No case has both a measured baseline and a measured method." in markdown
    assert "No figure has a measured baseline and another measured method." in markdown
    assert "| sdpa | error | error |" in markdown and "no calibration recorded" in markdown
    # the mask gallery and the curves (failed cases as markers): nothing measured, still the pattern
    assert sorted(p.stem for p in (folder / "report_files").glob("*.png")) == ["curves-causal-causal-self-fwd", "masks"]


def test_html_escapes_every_value_from_the_rows(tmp_path):
    reason = 'RuntimeError: <script>alert("x")</script> & more'
    rows = [make_row("esc", "sdpa", "causal", "fwd", 1024), make_row("esc", "flex<b>", "causal", "fwd", 1024,
                                                                     "error", reason=reason)]
    folder = write_run(tmp_path, "esc", rows, env_for("esc"))
    assert report.main([str(folder)]) == 0
    page = (folder / "report.html").read_text()
    assert "<script>alert" not in page and "flex<b>" not in page
    assert "RuntimeError: &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; more" in page
    assert "flex&lt;b&gt;" in page


def test_html_refuses_a_block_it_cannot_draw():
    from attnbench.report.model import Section
    from attnbench.report.render_html import render_html

    with pytest.raises(TypeError, match="unknown kind"):
        render_html("t", [Section("s", "S", [object()])])
