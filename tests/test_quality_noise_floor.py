"""The report's noise floor: the exact methods' spread on each task, and the approximate methods outside it."""
from __future__ import annotations

import pytest

from attnbench.report.document import main as report_main
from tests.test_quality_join import quality_row, write_quality_run


def rows_for(task, values, metric="accuracy", higher=True, exact=("sdpa", "flex"), failed=()):
    """values: {method: [value per seed]}; the methods in ``exact`` carry exact=True."""
    rows = []
    for method, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            status = "diverged" if (method, seed) in failed else "ok"
            rows.append(quality_row(task, "causal_self", method, 256, seed, value, status=status, metric=metric,
                                    higher=higher, exact=method in exact))
            rows.append(quality_row(task, "causal_self", method, 64, seed, 0.0, metric=metric, higher=higher,
                                    exact=method in exact))  # a shorter length: never part of the floor
    return rows


def floors_of(tmp_path, rows):
    from attnbench.record.quality import load_quality
    from attnbench.report.sections.quality import noise_floor

    folder = write_quality_run(tmp_path, "q", rows)
    frame = load_quality(folder).assign(run_dir="q")
    frame["x"] = frame["seq"].astype(float)
    frame["value"] = frame["value"].astype(float)
    return {f["task"]: f for f in noise_floor(frame)}


def test_the_exact_methods_band_and_who_lies_outside_it(tmp_path):
    rows = rows_for("mqar", {"sdpa": [0.9, 0.5], "flex": [0.8, 0.4],       # means 0.70 and 0.60: the band
                             "good": [0.99, 0.97], "mid": [0.7, 0.6], "bad": [0.1, 0.2],
                             "half": [0.99, 0.99]}, failed={("half", 1)})  # a failed seed: left out
    rows += rows_for("lm", {"sdpa": [3.0, 3.0], "flex": [3.0, 3.02], "lin": [2.5, 2.5], "worse": [3.5, 3.4]},
                     metric="bpc", higher=False)
    rows += rows_for("alone", {"sdpa": [1.0, 1.0], "lin": [0.5, 0.5]})  # one exact method: no floor
    floors = floors_of(tmp_path, rows)
    assert set(floors) == {"mqar", "lm"}
    mqar = floors["mqar"]
    assert (mqar["low"], mqar["high"]) == (pytest.approx(0.6), pytest.approx(0.7))
    assert mqar["seed_spread"] == pytest.approx(0.1)  # seed 0: 0.9 vs 0.8; seed 1: 0.5 vs 0.4
    assert [m for m, _ in mqar["better"]] == ["good"] and [m for m, _ in mqar["worse"]] == ["bad"]
    assert mqar["inside"] == 1 and mqar["length"] == 256  # "mid" (0.65); "half" is not counted at all
    lm = floors["lm"]  # lower is better: below the band is better
    assert [m for m, _ in lm["better"]] == ["lin"] and [m for m, _ in lm["worse"]] == ["worse"]


def test_the_report_prints_the_noise_floor_table(tmp_path):
    rows = rows_for("mqar", {"sdpa": [0.9, 0.5], "flex": [0.8, 0.4], "good": [0.99, 0.97]})
    folder = write_quality_run(tmp_path, "q", rows)
    assert report_main([str(folder), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("| mqar |") and "accuracy ↑" in line)
    assert "| 2 |" in line and "good 0.98" in line


def test_the_report_lists_each_tasks_training_setup(tmp_path):
    """The budget behind every metric is in the report: one row per task with the values its rows hold."""
    rows = [quality_row("mqar", "causal_self", m, n, 0, 0.5, steps=400, d_model=64, layers=2, lr=0.01)
            for m in ("sdpa", "flex") for n in (64, 128)]
    rows += [quality_row("lm", "causal_self", "sdpa", 512, 0, 3.0, metric="bpc", higher=False, steps=s, d_model=64,
                         layers=2, lr=0.003) for s in (300, 400)]  # two budgets in one task: both shown
    folder = write_quality_run(tmp_path, "q", rows)
    assert report_main([str(folder), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    table = text[text.index("Training setup per task"):]
    header = next(line for line in table.splitlines() if line.startswith("| task |"))
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    columns = cells(header)
    mqar = dict(zip(columns, cells(next(line for line in table.splitlines() if line.startswith("| mqar |")))))
    lm = dict(zip(columns, cells(next(line for line in table.splitlines() if line.startswith("| lm |")))))
    assert (mqar["steps"], mqar["lengths"], mqar["d_model"], mqar["lr"]) == ("400", "64 / 128", "64", "0.01")
    assert lm["steps"] == "300 / 400"
