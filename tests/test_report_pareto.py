"""The Pareto section of the report: approx_err against time per call, only where approx_err was measured."""
import numpy as np
import pytest
from runfixtures import env_for, make_row, write_run

from attnbench.record.rundir import load_run
from attnbench.report import document as report
from attnbench.report import plots
from attnbench.report.model import Cell, Plot, Table

# method -> (family, ms at 1k, ms at 4k, approx_err at 1k, approx_err at 4k); None: not measured
APPROXIMATE = {
    "fast_rough": ("linear", 0.1, 0.2, 0.30, 0.40),    # fastest, farthest from exact: on the front
    "balanced": ("sparse", 0.2, 0.5, 0.02, 0.05),      # slower, much closer: on the front
    "dominated": ("sparse", 0.3, 0.9, 0.25, 0.45),     # slower than balanced and farther: off the front
    "unmeasured": ("linear", 0.1, 0.3, None, None),    # ok but no approx_err: listed, not a point
}


def pareto_rows(run_id, with_values=True):
    """sdpa (exact, no approx_err) and four approximate methods at 1k and 4k, one of them failing at 4k."""
    rows = [make_row(run_id, "sdpa", "causal", "fwd", length, ms=ms) for length, ms in ((1024, 0.15), (4096, 1.0))]
    for method, (family, *times, err_1k, err_4k) in APPROXIMATE.items():
        for length, ms, err in zip((1024, 4096), times, (err_1k, err_4k)):
            extra = {"approx_err": err} if with_values and err is not None else {}
            rows.append(make_row(run_id, method, "causal", "fwd", length, ms=ms, family=family, exact=False,
                                 **extra))
    rows.append(make_row(run_id, "crashy", "causal", "fwd", 1024, ms=0.05, family="linear", exact=False,
                         **({"approx_err": 0.01} if with_values else {})))
    rows.append(make_row(run_id, "crashy", "causal", "fwd", 4096, "crashed", family="linear", exact=False,
                         reason="worker died: SIGSEGV"))
    return rows


@pytest.fixture
def pareto_run(tmp_path):
    return write_run(tmp_path, "approx", pareto_rows("approx"), env_for("approx"))


def sections_of(folder, baseline=None):
    return {s.anchor: s for s in report.build_report([load_run(folder)], baseline)}


def text_of(cell):
    return cell.text if isinstance(cell, Cell) else cell


def test_pareto_table_at_the_longest_length_with_approx_err(pareto_run):
    section = sections_of(pareto_run)["pareto"]
    table = [b for b in section.blocks if isinstance(b, Table)][0]
    assert table.header == ["mask · pattern · mode · shape", "length", "method", "status", "approx_err", "time (ms)",
                            "speed-up", "on front"]
    rows = {r[2]: r for r in table.rows}
    assert set(rows) == {"balanced", "crashy", "dominated", "fast_rough", "unmeasured"}  # sdpa: exact, no approx_err
    assert all(r[1] == "4k" for r in table.rows)
    assert [rows["fast_rough"][i] for i in (4, 5, 6, 7)] == ["0.4", "0.2", "5×", "yes"]
    assert [rows["balanced"][i] for i in (4, 5, 6, 7)] == ["0.05", "0.5", "2×", "yes"]
    assert [rows["dominated"][i] for i in (4, 5, 7)] == ["0.45", "0.9", ""]
    assert [rows["unmeasured"][i] for i in (4, 5, 7)] == ["", "0.3", ""]
    crashed = rows["crashy"][3]
    assert text_of(crashed) == "crashed" and crashed.title == "worker died: SIGSEGV"
    assert rows["crashy"][4] == rows["crashy"][5] == "" and rows["crashy"][6] == "no baseline"


def test_pareto_figure_draws_the_front_and_the_baseline(pareto_run, monkeypatch):
    drawn = []
    original = plots.pareto

    def capture(title, panels, palette):
        drawn.extend(panels)
        return original(title, panels, palette)

    monkeypatch.setattr(plots, "pareto", capture)
    section = sections_of(pareto_run)["pareto"]
    figures = [b for b in section.blocks if isinstance(b, Plot)]
    assert len(figures) == 1 and figures[0].png.startswith(b"\x89PNG")
    (panel,) = drawn
    points = {p.label: (p.x.tolist(), p.y.tolist()) for p in panel.points}
    assert points == {"balanced": ([0.5], [0.05]), "dominated": ([0.9], [0.45]), "fast_rough": ([0.2], [0.4])}
    assert panel.front.tolist() == [[0.2, 0.4], [0.5, 0.05]]
    assert panel.reference == (1.0, "baseline sdpa")
    assert "4k" in panel.title


def test_baseline_option_moves_the_reference(pareto_run):
    section = sections_of(pareto_run, baseline="balanced")["pareto"]
    rows = {r[2]: r for r in [b for b in section.blocks if isinstance(b, Table)][0].rows}
    assert rows["fast_rough"][6] == "2.5×" and rows["balanced"][6] == "1×"
    assert "the method balanced" in section.blocks[0].text


def test_pareto_section_is_in_both_written_reports(pareto_run):
    assert report.main([str(pareto_run)]) == 0
    markdown = (pareto_run / "report.md").read_text()
    page = (pareto_run / "report.html").read_text()
    assert '<a id="pareto"></a>' in markdown and "](report_files/pareto-0.png)" in markdown
    assert '<section id="pareto">' in page and 'href="#pareto"' in page
    assert (pareto_run / "report_files" / "pareto-0.png").is_file()


def test_no_pareto_section_without_measured_approx_err(tmp_path):
    rows = pareto_rows("plain", with_values=False)
    for row in rows:
        row["approx_err"] = np.nan
    folder = write_run(tmp_path, "plain", rows, env_for("plain"))
    assert "approx_err" in load_run(folder).rows  # a schema column: always there, empty in this run
    assert "pareto" not in sections_of(folder)
    assert report.main([str(folder)]) == 0
    assert "Approximation error against speed" not in (folder / "report.md").read_text()


def test_a_pareto_panel_can_name_its_front_and_keep_a_linear_y():
    """The quality panels: accuracy on a linear axis (a log axis of [0, 1] put 1.0 mid-figure) and the front's
    methods named on the axis. The default (approximation error) stays log with no names."""
    import numpy as np

    points = [plots.Points("fast", np.array([0.2]), np.array([0.6])),
              plots.Points("slow_good", np.array([2.0]), np.array([0.99])),
              plots.Points("dominated", np.array([3.0]), np.array([0.5]))]
    front = np.array([[0.2, 0.6], [2.0, 0.99]])
    palette = plots.Palette(["fast", "slow_good", "dominated"])
    named = plots.pareto("t", [plots.ParetoPanel("p", "accuracy", points, front, log_y=False, label_front=True)],
                         palette)
    ax = named.axes[0]
    assert ax.get_yscale() == "linear"
    assert sorted(t.get_text() for t in ax.texts) == ["fast", "slow_good"]  # the front only
    default = plots.pareto("t", [plots.ParetoPanel("p", "error", points, front)], palette)
    assert default.axes[0].get_yscale() == "log" and not default.axes[0].texts
