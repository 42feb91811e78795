"""`attnbench compare BASE NEW`: matching, the regression rule, exit codes, written files."""
import argparse

import pandas as pd
import pytest
from runfixtures import env_for, fixture_rows, write_run

from attnbench.report import compare as compare
from attnbench.record.rundir import load_run

SDPA_4K = {"method": "sdpa", "mask": "causal", "mode": "fwd", "seq_kv": 4096}
FLEX_4K = {"method": "flex", "mask": "causal", "mode": "fwd", "seq_kv": 4096}


def rows(run_id, device="NVIDIA H200"):
    return fixture_rows(run_id, device, cp=False, masks=("causal",), modes=("fwd",))


def matches(row, case):
    return all(row[k] == v for k, v in case.items())


def slow_down(row, factor, spread=None):
    """Scale the row's times by ``factor``; with ``spread``, set p20/p80 to median x (1 -+ spread)."""
    for column in ("ms_median", "ms_p20", "ms_p80", "ms_min"):
        row[column] *= factor
    if spread is not None:
        row["ms_p20"], row["ms_p80"] = row["ms_median"] * (1 - spread), row["ms_median"] * (1 + spread)


def write_pair(tmp_path, change, new_device="NVIDIA H200"):
    """BASE and NEW run folders; ``change(row)`` edits NEW's rows in place (and may drop them: return False)."""
    base = write_run(tmp_path, "base", rows("base"), env_for("base"))
    new_rows = [r for r in rows("new") if change(r) is not False]
    return base, write_run(tmp_path, "new", new_rows, env_for("new", new_device))


def verdicts(result):
    return {(r["method"], r["seq_kv"]): r["verdict"] for _, r in result.iterrows()}


def test_finds_a_planted_20_percent_regression(tmp_path, capsys):
    def plant(row):
        if matches(row, SDPA_4K):
            slow_down(row, 1.2)
    base, new = write_pair(tmp_path, plant)
    assert compare.main([str(base), str(new), "--fail-on-regression"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:2] == ["regression", "1.200"]
    assert "regressions: 1" in out
    assert compare.main([str(base), str(new)]) == 0  # reported, but CI only fails when asked


def test_ignores_a_difference_inside_the_recorded_spread(tmp_path):
    def noisy(row):
        if matches(row, FLEX_4K):
            slow_down(row, 1.08, spread=0.15)  # 8 % > 5 % threshold, but p20..p80 overlap BASE's
    base, new = write_pair(tmp_path, noisy)
    assert compare.main([str(base), str(new), "--fail-on-regression"]) == 0
    result = pd.read_csv(new / "compare.csv")
    flex = result[(result["method"] == "flex") & (result["seq_kv"] == 4096)].iloc[0]
    assert flex["verdict"] == "within spread" and flex["ratio"] == pytest.approx(1.08)


def test_a_difference_beyond_the_spread_but_under_the_threshold_is_unchanged(tmp_path):
    def small(row):
        if matches(row, SDPA_4K):
            slow_down(row, 1.04, spread=0.001)
    base, new = (load_run(folder).rows for folder in write_pair(tmp_path, small))
    assert verdicts(compare.compare_rows(base, new, 0.05))[("sdpa", 4096)] == "unchanged"
    assert verdicts(compare.compare_rows(base, new, 0.03))[("sdpa", 4096)] == "regression"


def test_status_changes_improvements_and_unmatched_cases(tmp_path):
    def change(row):
        if matches(row, SDPA_4K):
            row.update(status="crashed", reason="worker died", ms_median=None, ms_p20=None, ms_p80=None)
        if row["method"] == "eager" and row["seq_kv"] == 16384:  # was oom
            row.update(status="ok", reason=None, ms_median=5.0, ms_p20=4.9, ms_p80=5.1)
        if matches(row, FLEX_4K):
            slow_down(row, 0.7)
        if row["method"] == "flex" and row["seq_kv"] == 1024:
            return False
    base, new = write_pair(tmp_path, change)
    assert compare.main([str(base), str(new), "--fail-on-regression"]) == 1  # ok -> crashed is a regression
    found = verdicts(pd.read_csv(new / "compare.csv"))
    assert found[("sdpa", 4096)] == "new failure"
    assert found[("eager", 16384)] == "fixed"
    assert found[("flex", 4096)] == "improvement"
    assert found[("flex", 1024)] == "only in BASE"
    assert found[("buggy", 1024)] == "still failing"
    markdown = (new / "compare.md").read_text()
    assert "new failure: 1" in markdown
    assert "| new failure |  |  | 0.1878 |  | ok | crashed | sdpa · causal · fwd" in markdown  # no ratio invented


def test_cases_match_across_devices(tmp_path, capsys):
    base, new = write_pair(tmp_path, lambda row: None, new_device="NVIDIA B200")
    assert compare.main([str(base), str(new), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "different devices (NVIDIA H200 vs NVIDIA B200)" in out
    result = pd.read_csv(tmp_path / "out" / "compare.csv")
    assert len(result) == len(rows("x")) and set(result["verdict"]) == {"unchanged", "still failing"}
    assert "geometric-mean ratio NEW/BASE 1.000" in out


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.05", 0.05), ("12.5%", 0.125), ("0", 0.0)])
def test_threshold_forms(text, value):
    assert compare.parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["5", "abc", "-1%", "150%"])
def test_bad_thresholds_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        compare.parse_threshold(text)


@pytest.mark.parametrize("argv, message", [
    (["{base}", "{missing}"], "NEW '"),
    (["{missing}", "{base}"], "BASE '"),
    (["{base}", "{base}", "--threshold", "5"], "--threshold: ambiguous threshold '5'"),
    (["{base}"], "required: NEW"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    base = write_run(tmp_path, "base", rows("base"))
    paths = {"base": base, "missing": tmp_path / "missing"}
    assert compare.main([a.format(**paths) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_limit_truncates_the_printout_not_the_files(tmp_path, capsys):
    base, new = write_pair(tmp_path, lambda row: None)
    assert compare.main([str(base), str(new), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert f"... {len(rows('x')) - 3} more cases in compare.csv" in out
    assert len(pd.read_csv(new / "compare.csv")) == len(rows("x"))
