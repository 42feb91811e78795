"""The scaling section: log-log slopes (maths.loglog_slope, maths.scaling_fit), the figures at the longest length,
the lengths that did not run ok, and the forward rate against the baseline; numbers recomputed here with
numpy.polyfit on the fixture's own values, never read back from the code under test."""
from __future__ import annotations

import math

import numpy as np
import pytest
from runfixtures import env_for, make_row, write_run

from attnbench.record.rundir import load_run
from attnbench.report import document as report
from attnbench.report import maths
from attnbench.report.formatting import fmt
from attnbench.report.model import Cell, Table
from attnbench.report.sections import scaling

# ------------------------------------------------------------------------------------------------ the maths
POWERS = np.array([4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1 << 20], dtype=float)


def recovers_exponents(fit) -> bool:
    """The check the slope fit must pass: curves of known exponent (with a prefactor) give that exponent."""
    return all(abs(fit(POWERS, prefactor * POWERS ** exponent) - exponent) < 1e-6
               for exponent, prefactor in ((1.5, 3e-9), (1.0, 7e-5), (2.0, 1e-11), (0.0, 0.25)))


def test_known_exponents_are_recovered_to_1e_6():
    assert recovers_exponents(maths.loglog_slope)
    assert maths.loglog_slope(POWERS, 3e-9 * POWERS ** 1.5) == pytest.approx(1.5, abs=1e-6)
    assert maths.loglog_slope(POWERS, 7e-5 * POWERS) == pytest.approx(1.0, abs=1e-6)


def test_negative_control_a_fit_against_length_instead_of_log_length_is_caught():
    def against_length(lengths, values):  # the corrupted fit: log(value) on the length itself
        lengths, values = np.asarray(lengths, dtype=float), np.log(np.asarray(values, dtype=float))
        return float(np.polyfit(lengths, values, 1)[0])

    def linear_not_log(lengths, values):  # another: value on length, no logs at all
        return float(np.polyfit(np.asarray(lengths, float), np.asarray(values, float), 1)[0])

    assert not recovers_exponents(against_length)
    assert not recovers_exponents(linear_not_log)


def test_fewer_than_three_points_give_no_slope():
    assert maths.loglog_slope([4096, 8192], [1.0, 4.0]) is None
    assert maths.loglog_slope([4096, 8192, 16384], [1.0, np.nan, 16.0]) is None  # a NaN is not a point
    assert maths.loglog_slope([4096, 8192, 16384], [1.0, 0.0, 16.0]) is None  # nor is a time of 0
    assert maths.loglog_slope([4096, 4096, 8192], [1.0, 1.1, 4.0]) is None  # two distinct lengths
    assert maths.loglog_slope([4096, 8192, 16384], [1.0, 4.0, 16.0]) == pytest.approx(2.0, abs=1e-12)
    fit = maths.scaling_fit([16384, 32768], [1.0, 4.0])
    assert fit.slope is None and "2 measured lengths" in fit.reason and "needs 3" in fit.reason


def test_scaling_fit_takes_long_lengths_or_else_the_longest_three():
    times = 2e-9 * POWERS ** 1.5
    fit = maths.scaling_fit(POWERS, times, fit_from=16384)
    assert fit.lengths == tuple(POWERS[2:]) and fit.slope == pytest.approx(1.5, abs=1e-9)
    # a launch floor at short lengths bends the curve; the long-length fit leaves it out
    floored = times + 0.05
    long_fit = maths.scaling_fit(POWERS, floored, fit_from=262144)
    assert long_fit.lengths == tuple(POWERS[-3:])
    assert abs(long_fit.slope - 1.5) < abs(maths.loglog_slope(POWERS, floored) - 1.5)
    # only two lengths at or above 16k: the longest three instead
    fit = maths.scaling_fit(POWERS[:4], times[:4], fit_from=16384)
    assert fit.lengths == (8192.0, 16384.0, 32768.0) and fit.slope == pytest.approx(1.5, abs=1e-9)
    # unmeasured points do not count; order does not matter
    shuffled = maths.scaling_fit(POWERS[::-1], np.where(POWERS[::-1] == 65536, np.nan, times[::-1]))
    assert 65536.0 not in shuffled.lengths and shuffled.slope == pytest.approx(1.5, abs=1e-9)
    with pytest.raises(ValueError, match="repeated lengths"):
        maths.scaling_fit([4096, 4096, 8192, 16384], [1, 1, 2, 4])


# ------------------------------------------------------------------------------------------ the section
LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
DECODE_CONTEXTS = (8192, 32768, 131072, 524288)
WOBBLE = {L: 1 + 0.04 * math.sin(i * 1.7) for i, L in enumerate(sorted(set(LENGTHS) | set(DECODE_CONTEXTS)))}


def ms_of(method: str, length: int) -> float:
    """The fixture's time per call: a power law per method with a deterministic wobble (so slopes are not round)."""
    coefficient, exponent = {"sdpa_cudnn": (1e-8, 2.0), "fa_fast": (0.8e-8, 2.0), "routed": (2e-6, 1.5),
                             "local": (1e-3, 1.0), "short": (1e-7, 2.0), "kv_cache": (1e-5, 1.0),
                             "recurrent": (0.05, 0.0)}[method]
    return coefficient * length ** exponent * WOBBLE[length]


# (method, length) -> status for the cases that did not run ok
FAILED = {("sdpa_cudnn", 131072): "oom", ("fa_fast", 65536): "oom", ("fa_fast", 131072): "oom",
          ("local", 65536): "crashed", ("short", 16384): "timeout", ("short", 32768): "timeout",
          ("short", 65536): "timeout", ("short", 131072): "timeout"}
APPROXIMATE = {"routed", "local", "recurrent"}
FWD = "with length, causal · causal_self · fwd"  # caption of the forward slope table
DECODE = "with context length, causal · causal_self · decode"


def attended_tflops(length: int) -> float:
    """routed's recorded TFLOP/s on attended pairs: 300 at 4k rising to 600."""
    return 300.0 * (1 + math.log2(length / 4096) / 5)


def scaling_rows(run_id: str) -> list[dict]:
    rows = []
    for method in ("sdpa_cudnn", "fa_fast", "routed", "local", "short"):
        for length in LENGTHS:
            status = FAILED.get((method, length), "ok")
            extra = {"family": "sparse", "exact": False} if method in APPROXIMATE else {}
            if method == "routed" and status == "ok":
                extra.update(attended_pairs=1, tflops_attended=attended_tflops(length))
            rows.append(make_row(run_id, method, "causal", "fwd", length, status,
                                 ms=ms_of(method, length) if status == "ok" else None, **extra))
    for method in ("kv_cache", "recurrent"):
        for context in DECODE_CONTEXTS:
            extra = {"family": "linear", "exact": False} if method in APPROXIMATE else {}
            rows.append(make_row(run_id, method, "causal", "decode", context, ms=ms_of(method, context), **extra))
    rows.append(make_row(run_id, "local", "sliding_window(w=256)", "fwd", 4096, "unsupported",
                         reason="local: no sliding window"))
    return rows


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory):
    rows = scaling_rows("scaling")
    folder = write_run(tmp_path_factory.mktemp("runs"), "scaling", rows, env_for("scaling"))
    return folder, rows


def section_of(folder, **kwargs):
    sections = {s.anchor: s for s in report.build_report([load_run(folder)], **kwargs)}
    return sections["scaling"]


def text_of(cell):
    return cell.text if isinstance(cell, Cell) else cell


def table_of(section, caption_part) -> dict[str, dict[str, str]]:
    """{method: {column: text}} of the one table whose caption holds ``caption_part``."""
    found = [b for b in section.blocks if isinstance(b, Table) and caption_part in b.caption]
    assert len(found) == 1, [b.caption for b in section.blocks if isinstance(b, Table)]
    return {row[0]: dict(zip(found[0].header, map(text_of, row))) for row in found[0].rows}


def expected_slope(method: str, lengths) -> str:
    """The slope recomputed independently: numpy's degree-1 polyfit of log(ms) on log(length)."""
    lengths = np.asarray(lengths, dtype=float)
    times = [ms_of(method, int(L)) for L in lengths]
    return f"{np.polyfit(np.log(lengths), np.log(times), 1)[0]:.2f}"


def slope_errors(section, slope_from=16384) -> list[str]:
    """Where the forward slope table disagrees with the independent computation (empty: it agrees)."""
    table = table_of(section, FWD)
    errors = []
    for method in ("sdpa_cudnn", "fa_fast", "routed", "local"):
        ok = [L for L in LENGTHS if (method, L) not in FAILED]
        fitted = [L for L in ok if L >= slope_from]
        fitted = fitted if len(fitted) >= 3 else ok[-3:]
        want = expected_slope(method, fitted)
        if table[method]["slope"] != want:
            errors.append(f"{method}: slope {table[method]['slope']} != {want}")
        if table[method]["fitted lengths"] != ", ".join(f"{L // 1024}k" for L in fitted):
            errors.append(f"{method}: fitted {table[method]['fitted lengths']}")
        if table[method]["points"] != str(len(fitted)):
            errors.append(f"{method}: points {table[method]['points']}")
    return errors


def test_slopes_match_an_independent_fit(scaling_run):
    folder, _ = scaling_run
    assert slope_errors(section_of(folder)) == []
    table = table_of(section_of(folder), FWD)
    # a curve of exponent 2 with a 4 % wobble still reads about 2; routed about 1.5; local about 1
    assert abs(float(table["sdpa_cudnn"]["slope"]) - 2) < 0.15
    assert abs(float(table["routed"]["slope"]) - 1.5) < 0.15
    assert table["fa_fast"]["fitted lengths"] == "8k, 16k, 32k"  # two ok lengths >= 16k: the longest three
    assert table["local"]["fitted lengths"] == "16k, 32k, 128k"  # 64k crashed: not a point


def test_negative_control_a_corrupted_fit_in_the_section_is_caught(scaling_run, monkeypatch):
    folder, _ = scaling_run

    def against_length(lengths, values, fit_from=16384, min_points=3):
        fit = maths.scaling_fit(lengths, values, fit_from, min_points)
        if fit.slope is None:
            return fit
        x = np.asarray(fit.lengths)
        y = np.log([dict(zip(np.asarray(lengths, float), np.asarray(values, float)))[v] for v in x])
        return maths.SlopeFit(float(np.polyfit(x, y, 1)[0]), fit.lengths)

    monkeypatch.setattr(scaling, "scaling_fit", against_length)
    assert slope_errors(section_of(folder))


def test_no_slope_from_fewer_than_three_lengths_says_why(scaling_run):
    table = table_of(section_of(scaling_run[0]), FWD)
    assert table["short"]["slope"] == "no slope: 2 lengths ran ok, a slope needs 3"
    assert table["short"]["fitted lengths"] == "" and table["short"]["points"] == "2"


def test_longest_length_figures_and_the_lengths_that_did_not_run(scaling_run):
    folder, rows = scaling_run
    table = table_of(section_of(folder), FWD)
    header = next(iter(table.values())).keys()
    # 128k is the longest length any method ran ok: the columns are named by it
    assert "ms at 128k" in header and "TFLOP/s at 128k (visible pairs)" in header
    assert "TFLOP/s at 128k (attended pairs)" in header  # routed records attended pairs
    row = {(r["method"], r["seq_kv"]): r for r in rows if r["mode"] == "fwd" and r["mask"] == "causal"}
    for method in ("routed", "local"):
        assert table[method]["ms at 128k"] == fmt(ms_of(method, 131072))
        assert table[method]["TFLOP/s at 128k (visible pairs)"] == fmt(row[(method, 131072)]['tflops'])
        assert table[method]["longest ok, if shorter"] == ""
    assert table["routed"]["TFLOP/s at 128k (attended pairs)"] == fmt(attended_tflops(131072))
    assert table["local"]["TFLOP/s at 128k (attended pairs)"] == ""  # not recorded: not invented
    # sdpa_cudnn stopped at 64k: its 128k cell is the status; its own longest ok length is named
    assert table["sdpa_cudnn"]["ms at 128k"] == "oom"
    assert table["sdpa_cudnn"]["TFLOP/s at 128k (visible pairs)"] == ""
    assert table["sdpa_cudnn"]["longest ok, if shorter"] == (
        f"64k: {fmt(ms_of('sdpa_cudnn', 65536))} ms, {fmt(row[('sdpa_cudnn', 65536)]['tflops'])} TFLOP/s")
    assert table["sdpa_cudnn"]["not ok"] == "128k: oom"
    assert table["fa_fast"]["not ok"] == "64k: oom, 128k: oom"
    assert table["local"]["not ok"] == "64k: crashed"
    assert table["routed"]["not ok"] == ""
    assert table["short"]["not ok"] == "16k: timeout, 32k: timeout, 64k: timeout, 128k: timeout"


def test_decode_slopes_are_against_the_context_length(scaling_run):
    table = table_of(section_of(scaling_run[0]), DECODE)
    for method in ("kv_cache", "recurrent"):
        fitted = [c for c in DECODE_CONTEXTS if c >= 16384]
        assert table[method]["slope"] == expected_slope(method, fitted)
        assert table[method]["fitted lengths"] == "32k, 128k, 512k"
    assert abs(float(table["recurrent"]["slope"])) < 0.1  # flat step: ~0
    assert abs(float(table["kv_cache"]["slope"]) - 1) < 0.1
    assert "GB/s at 512k" in next(iter(table.values()))


def test_methods_unsupported_everywhere_are_named_not_tabled(scaling_run):
    section = section_of(scaling_run[0])
    assert not [b for b in section.blocks if isinstance(b, Table) and "sliding_window" in b.caption]
    assert any("unsupported at every length: local" in getattr(b, "text", "") for b in section.blocks)


def expected_share(rows, method, baseline, length):
    """A method's forward rate over the baseline's forward TFLOP/s at the same length, from the rows."""
    row = {r["method"]: r for r in rows if r["mode"] == "fwd" and r["seq_kv"] == length and r["mask"] == "causal"}
    rate = row[method].get("tflops_attended") or row[method]["tflops"]
    return rate / row[baseline]["tflops"]


@pytest.mark.parametrize("baseline", [None, "fa_fast"])
def test_rate_against_the_baseline_marks_the_target(scaling_run, baseline):
    folder, rows = scaling_run
    section = section_of(folder, baseline=baseline)
    name = baseline or "sdpa_cudnn"  # sdpa_cudnn by default though fa_fast is the faster exact method
    table = table_of(section, f"share of {name}'s forward TFLOP/s, causal · causal_self · fwd")
    assert table["routed"]["rate on"] == "attended pairs"
    assert table["local"]["rate on"] == "visible pairs (attention-equivalent)"
    assert table[name]["rate on"] == "baseline"
    other = "sdpa_cudnn" if baseline else "fa_fast"
    marked = 0
    for method in ("routed", "local", other):
        for length in LENGTHS:
            cell = table[method][f"{length // 1024}k"]
            if (method, length) in FAILED:
                assert cell == FAILED[(method, length)]
                continue
            if (name, length) in FAILED:
                assert cell == "no baseline"
                continue
            share = expected_share(rows, method, name, length)
            assert cell == f"{share:.0%}" + (" ✓" if share >= 0.8 else "")
            marked += share >= 0.8
    assert marked  # the fixture has cells on both sides of the target
    assert table[name]["4k"] == "100%"  # the baseline itself: no mark


def test_section_in_both_written_reports_and_slope_from_option(scaling_run, tmp_path, capsys):
    folder, _ = scaling_run
    out = tmp_path / "report"
    assert report.main([str(folder), "--out", str(out), "--slope-from", "4096"]) == 0
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert '<a id="scaling"></a>' in markdown and '<section id="scaling">' in page
    assert "| sdpa_cudnn | " + expected_slope("sdpa_cudnn", LENGTHS[:5]) + " | 4k, 8k, 16k, 32k, 64k | 5 |" in markdown
    assert report.main([str(folder), "--out", str(out), "--slope-from", "0"]) == 2
    assert "--slope-from 0" in capsys.readouterr().err
