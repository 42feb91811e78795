"""Noise: repetition times kept in the row, CPU interference flagged, significance tested in compare."""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from runfixtures import env_for, fixture_rows, write_run

from attnbench.measure import timing as timing
from attnbench.report import compare as compare

TIMING = {"budget_ms": 300, "warmup_ms": 0, "min_reps": 20, "max_reps": 400}


def busy_python():
    """A call that only computes (no I/O, no threads): its wall time is its CPU time unless it is descheduled."""
    return sum(i * i for i in range(3000))


# a competitor: pins itself to one CPU, says so, and spins for at most 20 s (killed earlier by the test)
SPINNER = ("import os, sys, time; os.sched_setaffinity(0, {%d}); print('spinning', flush=True); "
           "end = time.time() + 20\nwhile time.time() < end: pass")


@pytest.fixture
def competitors():
    """Start n busy processes pinned to the CPU this thread is pinned to; always reaped."""
    procs = []
    saved = os.sched_getaffinity(0)
    cpu = min(saved)

    def start(n: int) -> int:
        os.sched_setaffinity(0, {cpu})  # this thread only (Linux): the competitors share its CPU
        for _ in range(n):
            proc = subprocess.Popen([sys.executable, "-c", SPINNER % cpu], stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout.readline().strip() == "spinning"
        return cpu

    yield start
    os.sched_setaffinity(0, saved)
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_a_competing_process_on_the_cpu_is_flagged(competitors):
    competitors(2)  # two spinners on this thread's CPU: it gets about a third of it
    result = timing.time_cpu(busy_python, TIMING)
    assert any(flag.startswith("cpu_interference(") for flag in result.flags), result.flags


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_without_schedstat_the_cpu_time_rule_flags_a_competitor(competitors, monkeypatch):
    monkeypatch.setattr(timing, "_runqueue_wait_ns", lambda: None)  # a kernel without schedstat
    competitors(2)
    result = timing.time_cpu(busy_python, TIMING)
    assert any(flag.startswith("cpu_interference(cpu time") for flag in result.flags), result.flags


def test_the_interference_rule_on_given_counters():
    assert timing.interference_flag(wall_s=1.0, cpu_s=1.0, wait_s=0.02, load1=0.5, cpus=2) is None
    flag = timing.interference_flag(wall_s=1.0, cpu_s=0.4, wait_s=0.6, load1=3.0, cpus=2)
    assert flag == "cpu_interference(run-queue wait 60% of wall, load 3.0 on 2 cpus)"
    assert timing.interference_flag(wall_s=1.0, cpu_s=0.95, wait_s=None, load1=None, cpus=2) is None
    assert timing.interference_flag(wall_s=1.0, cpu_s=0.3, wait_s=None, load1=None, cpus=2).startswith(
        "cpu_interference(cpu time 30% of wall")
    assert ";" not in flag  # flags are ';'-separated


def test_the_probe_sees_this_process_wait_for_a_cpu(competitors):
    """The run-queue counter itself: with two spinners on our CPU we wait most of the time."""
    if timing._runqueue_wait_ns() is None:
        pytest.skip("no schedstat on this kernel")
    competitors(2)
    probe = timing.CpuProbe()
    end = timing.time.perf_counter() + 0.3
    while timing.time.perf_counter() < end:
        busy_python()
    counters = probe.measure()
    assert counters["wait_s"] / counters["wall_s"] > 0.3, counters


def test_samples_round_trip_and_summaries_agree():
    samples = [1.23456789, 0.000123456, 10.5, 2.0]
    text = timing.format_samples(samples)
    assert text == "1.2346;0.00012346;10.5;2"
    assert timing.parse_samples(text) == pytest.approx(samples, rel=1e-4)
    assert timing.parse_samples(None) == [] and timing.parse_samples("") == []
    assert timing.summarize(samples, "perf_counter").columns()["ms_samples"] == text


def test_a_row_keeps_its_repetition_times_and_the_timers_flags(monkeypatch):
    from attnbench.config.plan import Case
    from attnbench.execute.case import CaseRunner

    runner = CaseRunner("cpu", {"timing": {"budget_ms": 2, "warmup_ms": 0, "min_reps": 3, "max_reps": 6,
                                           "flush_l2": False}})
    case = Case(method="sdpa_math", mask="causal", mask_name="causal", batch=1, heads_q=2, heads_kv=2, seq_q=32,
                seq_kv=32, head_dim=16, dtype="float32", mode="fwd", layout="single", seed=0, device="cpu")
    row = runner.run(case)
    samples = timing.parse_samples(row["ms_samples"])
    assert row["status"] == "ok" and len(samples) == row["reps"]
    assert np.median(samples) == pytest.approx(row["ms_median"], rel=1e-4)

    original = timing.time_callable

    def interfered(*args, **kwargs):
        result = original(*args, **kwargs)
        result.flags.append("cpu_interference(run-queue wait 50% of wall)")
        return result

    monkeypatch.setattr(timing, "time_callable", interfered)
    row = runner.run(case)
    assert row["status"] == "ok" and "cpu_interference(run-queue wait 50% of wall)" in row["flags"].split(";")


# ---- Mann-Whitney U ---------------------------------------------------------------------------------------------
def brute_force_p(x, y) -> float:
    """Two-sided p of U by enumerating every split of the pooled values (the permutation distribution)."""
    pooled = np.concatenate([x, y])
    ranks = compare._midranks(pooled)
    n1, n = len(x), len(pooled)
    mean = n1 * (n + 1) / 2.0
    observed = abs(ranks[:n1].sum() - mean)
    splits = [abs(ranks[list(idx)].sum() - mean) for idx in itertools.combinations(range(n), n1)]
    return sum(s >= observed - 1e-9 for s in splits) / len(splits)


def test_exact_u_test_matches_enumeration():
    rng = np.random.default_rng(0)
    assert compare.mann_whitney([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == (0.0, pytest.approx(2 / 252))
    for n1, n2 in [(4, 5), (6, 6), (3, 7)]:
        x, y = rng.normal(0, 1, n1), rng.normal(0.7, 1, n2)
        u, p = compare.mann_whitney(x, y)
        assert p == pytest.approx(brute_force_p(x, y), abs=1e-12)
        assert compare.mann_whitney(y, x)[1] == pytest.approx(p)  # symmetric
        assert u + compare.mann_whitney(y, x)[0] == n1 * n2


def test_normal_approximation_with_ties_is_close_to_enumeration():
    rng = np.random.default_rng(1)
    x, y = np.round(rng.normal(0, 1, 8), 1), np.round(rng.normal(0.8, 1, 8), 1)  # rounded: ties
    assert len(np.unique(np.concatenate([x, y]))) < 16
    assert compare.mann_whitney(x, y)[1] == pytest.approx(brute_force_p(x, y), abs=0.02)
    assert compare.mann_whitney([2.0] * 5, [2.0] * 5)[1] == 1.0


def test_u_test_is_calibrated_on_equal_distributions():
    rng = np.random.default_rng(2)
    ps = [compare.mann_whitney(rng.normal(1, 0.05, 40), rng.normal(1, 0.05, 40))[1] for _ in range(200)]
    assert 0.02 <= np.mean(np.array(ps) < 0.1) <= 0.2  # about 10 % below 0.1
    shifted = [compare.mann_whitney(rng.normal(1, 0.05, 40), rng.normal(1.08, 0.05, 40))[1] for _ in range(20)]
    assert max(shifted) < 1e-3


# ---- compare with samples ------------------------------------------------------------------------------------
def _with_samples(rows, rng, scale_of, n=60, spread=0.05):
    """Give every ok row ``n`` repetition times around its median x ``scale_of(row)``; p20/p80 from them."""
    for row in rows:
        if row["status"] != "ok":
            continue
        samples = row["ms_median"] * scale_of(row) * rng.normal(1.0, spread, n)
        row.update(ms_samples=timing.format_samples(samples), ms_median=float(np.median(samples)),
                   ms_p20=float(np.quantile(samples, 0.2)), ms_p80=float(np.quantile(samples, 0.8)),
                   ms_min=float(samples.min()), reps=n)
    return rows


def _pair(tmp_path, scale_of, n=60, spread=0.05, interfered=None):
    rng = np.random.default_rng(3)
    base_rows = _with_samples(fixture_rows("base", cp=False, masks=("causal",), modes=("fwd",)),
                              rng, lambda row: 1.0, n, spread)
    new_rows = _with_samples(fixture_rows("new", cp=False, masks=("causal",), modes=("fwd",)),
                             rng, scale_of, n, spread)
    for row in new_rows:
        if interfered and interfered(row):
            row["flags"] = "cpu_interference(run-queue wait 40% of wall, load 3.0 on 2 cpus)"
    return (write_run(tmp_path, "base", base_rows, env_for("base")),
            write_run(tmp_path, "new", new_rows, env_for("new")))


def _target(row):
    return row["method"] == "sdpa" and row["seq_kv"] == 4096


def test_a_significant_shift_inside_the_p20_p80_spread_is_a_regression(tmp_path, capsys):
    """8 % slower, 5 % noise, 60 repetitions: the p20-p80 intervals overlap, the U test is sure."""
    base, new = _pair(tmp_path, lambda row: 1.08 if _target(row) else 1.0)
    assert compare.main([str(base), str(new), "--fail-on-regression"]) == 1
    result = pd.read_csv(new / "compare.csv")
    hit = result[(result.method == "sdpa") & (result.seq_kv == 4096)].iloc[0]
    assert hit.ms_p20_new < hit.ms_p80_base  # the old spread rule would have said "within spread"
    assert hit.verdict == "regression" and hit.p_value < 1e-4
    out = capsys.readouterr().out
    assert "Mann-Whitney p < 0.01" in out and "<1e-4" in out
    assert "| regression | 1.0" in (new / "compare.md").read_text()


def test_a_large_ratio_from_few_noisy_samples_is_not_significant(tmp_path):
    base, new = _pair(tmp_path, lambda row: 1.15 if _target(row) else 1.0, n=4, spread=0.3)
    result = compare.compare_rows(compare.load_runs([str(base)], tmp_path)[0].rows,
                                  compare.load_runs([str(new)], tmp_path)[0].rows, 0.05)
    hit = result[(result.method == "sdpa") & (result.seq_kv == 4096)].iloc[0]
    assert not math.isnan(hit.p_value) and hit.p_value >= 0.01
    assert hit.verdict in ("not significant", "unchanged")
    assert hit.verdict != "regression"


def test_compare_counts_rows_flagged_for_interference(tmp_path, capsys):
    base, new = _pair(tmp_path, lambda row: 1.0, interfered=_target)
    assert compare.main([str(base), str(new)]) == 0
    assert "1 cases flagged cpu_interference on a side" in capsys.readouterr().out
