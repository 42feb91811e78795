"""The task grid plan (attnbench.execute.task_grid, scripts/plan_task_grid.py, scripts/device_task_grid.sh):
every (task, method, length, seed) case in exactly one call, unsupported ones as planned rows, calls within
budget, finished cases dropped, and a coverage check that catches a plan that drops or repeats a slice."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from attnbench.execute import task_grid
from attnbench.execute.task_grid import CostModel, KernelCost, StepFit, check_coverage, grid_cases, make_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d_model=16, heads=2, layers=1, batch=4, steps=100, eval_batches=1, warmup=1)
GRID = {
    "tasks": ["sort", "mqar"],
    "methods": ["sdpa_math", "eager", "sdpa_flash", "halo_2d"],
    "seeds": [0, 1, 2],
    "dtype": "bfloat16",
    "device": "cuda",
    "case_timeout_s": 600,
    "task_options": {"sort": {**TINY, "seq_lens": [8, 16]},
                     "mqar": {**TINY, "vocab": 128, "kv_pairs": 2, "seq_lens": [16, 32]}},
}
BUDGET = 150.0


def cost_model(slow_ms: float = 200.0) -> CostModel:
    """10 ms a step for every method, eager ``slow_ms`` more per call; sdpa_flash 'unavailable on the H200'."""
    slow = KernelCost("eager", "causal", "test", 2048, task_grid.REFERENCE_WORK, slow_ms, 0.0, 0.0, 1.0)
    return CostModel(step_fits={}, default_fit=StepFit(0.01, 0.0, "test"), kernels={("eager", "causal"): slow},
                     default_extra_ms={True: 0.0, False: 0.0}, default_compile_s=0.0, case_overhead_s=0.5,
                     unavailable={"sdpa_flash": "method unavailable: needs module 'x' (in test)"})


@pytest.fixture(scope="module")
def grid():
    cfg = copy.deepcopy(GRID)
    return cfg, grid_cases(cfg), make_plan(cfg, cost_model(), BUDGET)


def test_every_case_is_in_exactly_one_call_and_unsupported_ones_are_planned_rows(grid):
    cfg, cases, plan = grid
    assert len(cases) == 2 * 4 * 2 * 3  # tasks x methods x lengths x seeds, nothing left out by the planner
    assert check_coverage(cfg, plan) == []
    entries = {e["case_id"]: e for e in plan["cases"]}
    assert set(entries) == {case.case_id for case, _ in cases}
    assert all(isinstance(e["call"], int) and 0 <= e["call"] < len(plan["calls"]) for e in entries.values())
    unsupported = {(e["task"], e["method"]) for e in entries.values() if e["planned"] == "unsupported"}
    # halo_2d: full mask only, no cross; sdpa_flash: expected unavailable; eager/sdpa_math run everything here
    assert unsupported == {("sort", "halo_2d"), ("mqar", "halo_2d"), ("sort", "sdpa_flash"), ("mqar", "sdpa_flash")}
    assert all(e["reason"] and e["est_s"] == 0 for e in entries.values() if e["planned"] == "unsupported")
    flash = [e for e in entries.values() if e["method"] == "sdpa_flash"]
    assert all(e["reason"].startswith("expected: method unavailable") for e in flash)
    # each slice lists the methods it runs, and its planned unsupported ones, as `attnbench train` overrides
    for call in plan["calls"]:
        for piece in call["slices"]:
            assert piece["overrides"] == [f"tasks=[{','.join(piece['tasks'])}]", f"methods=[{','.join(piece['methods'])}]",
                                          f"seeds=[{','.join(map(str, piece['seeds']))}]"]
    totals = plan["totals"]
    assert (totals["to_run"], totals["unsupported"]) == (24, 24)


def test_calls_stay_within_budget_and_a_method_task_over_a_call_is_split_by_seed(grid):
    cfg, _, plan = grid
    assert len(plan["calls"]) > 1
    for call in plan["calls"]:
        assert call["est_s"] <= BUDGET
        assert call["est_s"] == pytest.approx(task_grid.CALL_OVERHEAD_S + sum(p["est_s"] for p in call["slices"]),
                                              abs=0.2)
    eager = [p for c in plan["calls"] for p in c["slices"] if "eager" in p["methods"]]
    # eager: 101 steps x 0.21 s = 21 s a case, 127 s for 2 lengths x 3 seeds: over the call alone -> one seed a slice
    assert sorted(s for p in eager for s in p["seeds"]) == [0, 0, 1, 1, 2, 2] and all(len(p["seeds"]) == 1 for p in eager)
    est = {(e["method"], e["seq"]): e["est_s"] for e in plan["cases"] if e["task"] == "mqar"}
    assert est[("eager", 16)] > 10 * est[("sdpa_math", 16)]  # the cost model charges the slow method
    assert plan["totals"]["est_s"] == pytest.approx(sum(c["est_s"] for c in plan["calls"]), abs=0.5)


def test_the_coverage_check_catches_a_dropped_a_repeated_and_a_foreign_slice_and_an_over_budget_call(grid):
    cfg, _, plan = grid
    dropped = copy.deepcopy(plan)
    piece = dropped["calls"][0]["slices"].pop(0)
    problems = check_coverage(cfg, dropped)
    assert problems and all("in no call (dropped)" in p for p in problems)
    assert len(problems) == piece["runs"] + piece["unsupported"]

    repeated = copy.deepcopy(plan)
    repeated["calls"][-1]["slices"].append(copy.deepcopy(plan["calls"][0]["slices"][0]))
    assert any("in 2 slices" in p for p in check_coverage(cfg, repeated))

    foreign = copy.deepcopy(plan)
    foreign["calls"][0]["slices"][0]["seeds"] = [0, 1, 2, 3]
    assert any("is not a case of the grid" in p for p in check_coverage(cfg, foreign))

    heavy = copy.deepcopy(plan)
    heavy["calls"][0]["est_s"] = BUDGET + 1
    assert any("over the budget" in p for p in check_coverage(cfg, heavy))


def test_done_cases_are_dropped_and_the_rest_is_planned_once(grid, tmp_path):
    cfg, cases, _ = grid
    run_dir = tmp_path / "h200-task-grid"
    run_dir.mkdir()
    finished = [case for case, _ in cases if case.seed == 0]
    retried = next(case for case, reason in cases if case.seed == 1 and reason is None)
    rows = [{"case_id": c.case_id, "status": "ok"} for c in finished] + [{"case_id": retried.case_id,
                                                                          "status": "timeout"}]
    (run_dir / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = task_grid.done_case_ids(run_dir, retry=("timeout",))
    assert done == {c.case_id for c in finished}  # the timeout row is planned again
    plan = make_plan(cfg, cost_model(), BUDGET, done)
    assert check_coverage(cfg, plan, done) == []
    assert plan["totals"]["done"] == len(finished)
    todo = {e["case_id"] for e in plan["cases"] if not e["done"]}
    assert todo == {c.case_id for c, _ in cases} - done and retried.case_id in todo
    assert all(0 not in p["seeds"] for c in plan["calls"] for p in c["slices"])
    whole = make_plan(cfg, cost_model(), BUDGET)
    assert plan["totals"]["est_s"] < whole["totals"]["est_s"]
    # without --done the same check sees the finished cases as dropped: --done is what allows leaving them out
    assert any("dropped" in p for p in check_coverage(cfg, plan))


def test_train_planner_resolves_all_methods_and_all_train_tasks():
    from attnbench.execute.train import build_train_plan
    from attnbench.methods import METHODS
    from attnbench.tasks import TASKS

    cfg = {**copy.deepcopy(GRID), "tasks": ["all_train"], "methods": "all", "seeds": [0], "task_options": {}}
    plan = build_train_plan(cfg, target_device="cuda", check_availability=False)
    cases = plan.runnable + [case for case, _ in plan.unsupported]
    train_tasks = {name for name, spec in TASKS.items() if spec.cls.kind == "train"}
    assert {c.task for c in cases} == train_tasks and "planted_recall" not in train_tasks
    for task in train_tasks:  # every method on every task that trains, at each of its lengths
        lengths = len({c.seq for c in cases if c.task == task})
        assert len([c for c in cases if c.task == task]) == lengths * len(METHODS)
    assert all(reason for _, reason in plan.unsupported)
    # the target device, not this machine, decides: a CUDA-only method is runnable when planning for cuda
    assert any(c.method == "sdpa_cudnn" for c in plan.runnable)
    here = build_train_plan({**cfg, "device": "cpu", "tasks": ["sort"]}, target_device="cpu")
    assert any(c.method == "sdpa_cudnn" for c, _ in here.unsupported)


def test_script_writes_the_plan_and_its_slices_compose_through_hydra(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import plan_task_grid
    finally:
        sys.path.pop(0)
    overrides = ["tasks=[sort]", "methods=[sdpa_math,halo_2d]", "seeds=[0,1]", "task_options.sort.steps=3",
                 "task_options.sort.seq_lens=[8,16]", "task_options.sort.d_model=16", "task_options.sort.batch=4"]
    out = tmp_path / "plan"
    assert plan_task_grid.main(["--out", str(out), *overrides]) == 0
    plan = task_grid.load_plan(out.with_suffix(".json"))
    assert plan["overrides"] == overrides[3:]  # the slices set tasks, methods and seeds themselves
    assert out.with_suffix(".md").read_text().count("| `tasks=[sort]") == len(plan["calls"][0]["slices"])
    wanted = {e["case_id"] for e in plan["cases"]}
    got = set()
    for call in plan["calls"]:
        for piece in call["slices"]:  # what `attnbench train suite=tasks_grid <overrides>` would plan
            cfg = task_grid.compose_suite("tasks_grid", (*plan["overrides"], *piece["overrides"]))
            got |= {case.case_id for case, _ in grid_cases(cfg)}
    assert got == wanted and len(wanted) == 2 * 2 * 2
    assert plan_task_grid.main(["--out", str(out), "tasks=[nope]"]) == 2  # a bad config names its field


@pytest.mark.slow
def test_device_script_runs_a_call_into_one_run_folder_and_resumes(tmp_path):
    """scripts/device_task_grid.sh on the CPU (INSTALL=0, a tiny plan): the call's rows, then a resume adds none."""
    overrides = ["device=cpu", "dtype=float32", "tasks=[sort]", "methods=[sdpa_math,sdpa_cudnn]", "seeds=[0]",
                 "task_options.sort.steps=1", "task_options.sort.seq_lens=[8]", "task_options.sort.d_model=16",
                 "task_options.sort.batch=4", "task_options.sort.eval_batches=1"]
    cfg = task_grid.compose_suite("tasks_grid", tuple(overrides))
    plan = make_plan(cfg, cost_model(), BUDGET, run_id="tiny-grid", target_device="cpu", parallel=2,
                     throughput=throughput())
    plan["overrides"] = overrides[:2] + overrides[5:]
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(task_grid.to_json(plan))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bin_dir / "python3").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()

    def call(out, *calls):
        out.mkdir()
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "INSTALL": "0",
               "PLAN": str(plan_path), "SCRATCH": str(tmp_path / "scratch")}
        script = str(ROOT / "scripts" / "device_task_grid.sh")
        subprocess.run(["bash", script, *(calls or ("0",))], cwd=work, env=env, check=True,
                       capture_output=True, timeout=240)
        # what the device tool returns: at most 8 files, none more than 2 folders down (else the rest is lost)
        files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
        assert len(files) <= 8 and all(len(p.parts) <= 3 for p in files), files
        unpacked = out / "unpacked"
        with tarfile.open(out / "runs.tgz") as tar:
            tar.extractall(unpacked)
        with tarfile.open(out / "logs.tgz") as tar:
            assert any(name.startswith("logs/slice") for name in tar.getnames())
        return [json.loads(line) for line in (unpacked / "results" / "tiny-grid" / "quality.jsonl").read_text().splitlines()]

    rows = call(tmp_path / "out1")
    assert {r["case_id"] for r in rows} == {e["case_id"] for e in plan["cases"]}
    assert {r["concurrent"] for r in rows} == {2}  # PARALLEL defaults to the plan's parallel
    assert {r["method"]: r["status"] for r in rows} == {"sdpa_math": "ok", "sdpa_cudnn": "unsupported"}
    # the committed run folder (results/<run_id> in the checkout) is resumed, not re-run: out2 (a row turned
    # error, no retry; the call twice) adds no row
    (work / "results").mkdir()
    os.rename(tmp_path / "out1" / "unpacked" / "results" / "tiny-grid", work / "results" / "tiny-grid")
    committed = work / "results" / "tiny-grid" / "quality.jsonl"
    lines = committed.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if json.loads(line)["status"] == "ok")
    first = json.loads(lines[at])
    committed.write_text("\n".join([*lines[:at], json.dumps({**first, "status": "error", "reason": "x"}),
                                     *lines[at + 1:]]) + "\n")
    # several planned calls in one device call: their slices in order (a repeated slice resumes: no new rows);
    # negative control of the retry below: without the plan's retry, the error row is not re-run
    plan["calls"].append(plan["calls"][0])
    plan_path.write_text(task_grid.to_json(plan))
    assert len(call(tmp_path / "out2", "0", "1")) == len(rows)
    assert len((tmp_path / "out2" / "slices-done.txt").read_text().splitlines()) == 2 * len(plan["calls"][0]["slices"])
    # a row the plan re-plans (plan_task_grid.py --retry error): the call re-runs it because the plan says so
    plan["retry"] = ["error"]
    plan_path.write_text(task_grid.to_json(plan))
    again = call(tmp_path / "out3")
    assert len(again) == len(rows) + 1 and again[-1]["case_id"] == first["case_id"] and again[-1]["status"] == "ok"
    # a call the plan does not have: exit 2 before any work, the index named
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "device_task_grid.sh"), "0", "7"], cwd=work,
                         env={**os.environ, "OUT": str(tmp_path), "INSTALL": "0", "PLAN": str(plan_path)},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "call 7 is not in the plan" in bad.stdout


def test_cost_model_reads_the_committed_run_layout(tmp_path):
    """Step fit from baseline task rows, the extra ms of a method's kernel row, an unavailable method."""
    import pandas as pd

    from attnbench.execute.train import TrainCase

    (tmp_path / "h200-tasks").mkdir()
    pd.DataFrame({"task": ["sort"] * 4, "method": ["sdpa_cudnn", "sdpa_cudnn", "eager", "sdpa_cudnn"],
                  "status": ["ok"] * 4, "steps_done": [100] * 4, "batch": [4] * 4, "seq": [8, 16, 8, 16],
                  "train_wall_s": [1.0, 1.4, 9.0, 7.0], "wall_s": [1.2, 1.6, 9.5, 7.2],
                  "concurrent": pd.array([None, 1, 1, 4], dtype="Int64")}  # the last: trained beside 3 others
                 ).to_parquet(tmp_path / "h200-tasks" / "quality.parquet")
    (tmp_path / "h200-linear").mkdir()
    kernel = dict(mode="fwd_bwd", mask="causal", seq_q=2048, seq_kv=2048, batch=1, heads_q=16, head_dim=128,
                  compile_s=0.5, reason=None)
    pd.DataFrame([{**kernel, "method": "sdpa_cudnn", "status": "ok", "ms_median": 1.0},
                  {**kernel, "method": "eager", "status": "ok", "ms_median": 4.0},
                  {**kernel, "method": "flash_attn", "status": "unsupported", "ms_median": None,
                   "reason": "method unavailable: needs module 'flash_attn'"}]
                 ).to_parquet(tmp_path / "h200-linear" / "rows.parquet")
    cost = CostModel.from_results(tmp_path, kernel_runs=("h200-linear",), task_runs=("h200-tasks",))
    fit = cost.step_fits["sort"]
    # eager's row is not the baseline; the row with concurrent=4 (parallel=4) is not a serial step time
    assert fit.at(32) == pytest.approx(0.010) and fit.at(64) == pytest.approx(0.014)
    params = json.dumps({**TINY, "seq_lens": [8], "layers": 2, "d_model": 16, "batch": 4}, sort_keys=True)
    base, _ = cost.step_seconds(TrainCase("sort", "sdpa_cudnn", 8, 0, "bfloat16", params))
    slow, basis = cost.step_seconds(TrainCase("sort", "eager", 8, 0, "bfloat16", params))
    assert base == pytest.approx(0.010) and slow == pytest.approx(0.010 + 2 * 3.0 / 1000) and "h200-linear" in basis
    assert "flash_attn" in cost.unavailable and "eager" not in cost.unavailable
    assert cost.case_seconds(TrainCase("sort", "eager", 8, 0, "bfloat16", params), timeout_s=0.5) == pytest.approx(
        cost.case_overhead_s + 0.5 + slow)  # capped at the case timeout plus one step


# ---- parallel=N: the throughput factor, and plans sized with it ------------------------------------------------
def throughput(factor_at_8: float = 4.0) -> task_grid.Throughput:
    return task_grid.Throughput(8, factor_at_8, 1, "test")


def test_throughput_factor_grows_with_n_but_less_than_n_and_not_past_what_was_measured():
    tp = throughput(4.0)
    factors = [tp.factor(n) for n in range(1, 9)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(4.0)
    assert all(b > a for a, b in zip(factors, factors[1:]))  # more cases at once: more throughput ...
    assert all(f < n for n, f in zip(range(2, 9), factors[1:]))  # ... but less than n times
    assert tp.factor(16) == pytest.approx(4.0)  # no gain assumed past the measured concurrency
    assert task_grid.Throughput.serial().factor(8) == 1.0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="parallel"):
            tp.factor(bad)


def test_throughput_is_fitted_on_rows_trained_at_concurrency_against_the_serial_model(tmp_path):
    """Per row N x the model's serial step / the measured step; a row of a task without a serial fit, or a
    serial row, is not used; the factor is a low quantile of those times the margin."""
    import pandas as pd

    cost = CostModel(step_fits={"sort": StepFit(0.010, 0.0, "test")}, default_fit=StepFit(0.01, 0.0, "test"),
                     kernels={}, default_extra_ms={True: 0.0, False: 0.0}, default_compile_s=0.0, case_overhead_s=0.5)
    (tmp_path / "par").mkdir()
    base = dict(method="sdpa_math", status="ok", seq=16, batch=4, d_model=16, layers=1, heads=2, model_options=None)
    # 8 x 10 ms / measured: 20 ms -> 4, 40 ms -> 2, 10 ms -> 8; the mqar row (no serial fit) and the serial row: unused
    rows = [dict(base, task="sort", steps_done=100, train_wall_s=2.0, concurrent=8),
            dict(base, task="sort", steps_done=100, train_wall_s=4.0, concurrent=8),
            dict(base, task="sort", steps_done=100, train_wall_s=1.0, concurrent=8),
            dict(base, task="mqar", steps_done=100, train_wall_s=100.0, concurrent=8),
            dict(base, task="sort", steps_done=100, train_wall_s=100.0, concurrent=1)]
    pd.DataFrame(rows).to_parquet(tmp_path / "par" / "quality.parquet")
    tp = task_grid.Throughput.from_results(tmp_path, cost, runs=("par",), task_runs=())
    assert (tp.measured_n, tp.rows) == (8, 3)
    assert sorted(tp.row_factors.values()) == pytest.approx([2.0, 4.0, 8.0])
    expected = (2.0 + (4.0 - 2.0) * task_grid.THROUGHPUT_QUANTILE * 2) * task_grid.THROUGHPUT_MARGIN
    assert tp.factor_at_measured == pytest.approx(expected)
    assert "concurrent=8" in tp.basis
    empty = task_grid.Throughput.from_results(tmp_path, cost, runs=("nothing-here",), task_runs=())
    assert empty.factor(8) == 1.0


def test_parallel_plans_fit_more_in_a_call_and_estimate_each_slice_at_its_concurrency(grid):
    cfg, _, serial_plan = grid
    tp = throughput(4.0)
    plan = make_plan(copy.deepcopy(cfg), cost_model(), BUDGET, parallel=8, throughput=tp)
    assert check_coverage(cfg, plan) == []
    assert plan["parallel"] == 8 and plan["throughput"]["factor"] == pytest.approx(4.0)
    assert len(plan["calls"]) < len(serial_plan["calls"])
    assert plan["totals"]["est_s"] < serial_plan["totals"]["est_s"]
    for call in plan["calls"]:
        assert call["est_s"] <= BUDGET
        walls = [task_grid.INVOCATION_OVERHEAD_S + p["first_s"] + p["serial_s"] / tp.factor(max(1, min(8, p["runs"])))
                 for p in call["slices"]]
        assert call["est_s"] == pytest.approx(task_grid.CALL_OVERHEAD_S + sum(walls), abs=0.5)
    with pytest.raises(ValueError, match="parallel"):
        make_plan(copy.deepcopy(cfg), cost_model(), BUDGET, parallel=0, throughput=tp)


def test_over_max_calls_later_seeds_of_the_slowest_methods_go_to_follow_up_calls(grid):
    cfg, _, whole = grid
    assert len(whole["calls"]) > 1
    assert len(whole["calls"]) > 2
    plan = make_plan(copy.deepcopy(cfg), cost_model(), BUDGET, max_calls=2)
    assert check_coverage(cfg, plan) == []  # every case still in exactly one call
    main = [c for c in plan["calls"] if not c["follow_up"]]
    follow = [c for c in plan["calls"] if c["follow_up"]]
    assert len(main) <= 2 and follow and plan["totals"]["follow_up_calls"] == len(follow)
    assert [c["index"] for c in plan["calls"]] == list(range(len(plan["calls"])))
    assert all(not c["follow_up"] for c in plan["calls"][:len(main)])  # follow-up calls come after the main ones
    deferred = plan["deferred_methods"]
    assert deferred and deferred[0] == "eager"  # the slow method here goes first
    later = [e for e in plan["cases"] if e["call"] is not None and plan["calls"][e["call"]]["follow_up"]]
    assert later and all(e["seed"] != 0 and e["method"] in deferred for e in later)
    # every later seed of a deferred method (unsupported cases too) is in the follow-up; its seed 0 is not
    assert {e["case_id"] for e in later} == {e["case_id"] for e in plan["cases"]
                                             if e["method"] in deferred and e["seed"] != 0}
    md = task_grid.render_markdown(plan)
    assert "## Follow-up" in md and "(follow-up)" in md
    # with room for the whole grid nothing is deferred
    roomy = make_plan(copy.deepcopy(cfg), cost_model(), BUDGET, max_calls=len(whole["calls"]))
    assert not any(c["follow_up"] for c in roomy["calls"]) and roomy["deferred_methods"] == []


def test_fla_autotuning_is_charged_once_per_method_and_attention_shape():
    from attnbench.execute.train import TrainCase

    cost = cost_model()

    def case(task, d_model, heads, seq=16):
        params = json.dumps({**TINY, "d_model": d_model, "heads": heads}, sort_keys=True)
        return TrainCase(task, "fla_delta_rule", seq, 0, "bfloat16", params)

    key, seconds = cost.first_call(case("mqar", 64, 2))
    assert seconds == task_grid.AUTOTUNE_FIRST_CALL_S
    assert cost.first_call(case("niah", 64, 2, seq=256))[0] == key  # another task and length, the same shape
    assert cost.first_call(case("niah", 64, 4))[0] != key  # other heads: other autotuning keys
    assert cost.first_call(case("niah", 128, 2))[0] != key  # another head width


def test_script_refuses_a_bad_parallel_naming_the_flag(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import plan_task_grid
    finally:
        sys.path.pop(0)
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exc:
            plan_task_grid.main(["--out", str(tmp_path / "plan"), "--parallel", bad])
        assert exc.value.code == 2
        assert "--parallel" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()


# ---- the factor measured on the run itself (--done) -----------------------------------------------------------
def _done_run(tmp_path, cfg, cost, speedup: float, concurrent: int = 8) -> tuple:
    """A run folder whose rows (every runnable case of ``cfg``, all started at once at ``concurrent``) took
    (their serial estimate + first calls) / ``speedup`` of wall together -> (run dir, that work in seconds)."""
    import datetime as dt

    timeout = float(cfg["case_timeout_s"])
    runnable = [case for case, reason in grid_cases(cfg) if reason is None and case.method not in cost.unavailable]
    firsts = dict(cost.first_call(case) for case in runnable)
    work = sum(cost.case_seconds(case, timeout) for case in runnable) + sum(firsts.values())
    span = work / speedup
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for case in runnable:
        params = case.params
        rows.append({"case_id": case.case_id, "task": case.task, "method": case.method, "seq": case.seq,
                     "seed": case.seed, "status": "ok", "steps_done": params["steps"], "concurrent": concurrent,
                     "started_at": start.isoformat(timespec="seconds"), "wall_s": span})
    run_dir = tmp_path / "h200-task-grid"
    run_dir.mkdir()
    (run_dir / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir, work


def test_a_run_whose_rows_finished_faster_than_estimated_raises_the_factor(grid, tmp_path):
    cfg, _, _ = grid
    cost, fallback = cost_model(), throughput(4.0)
    run_dir, work = _done_run(tmp_path, cfg, cost, speedup=12.0)
    tp = task_grid.Throughput.from_run(run_dir, cost, cfg, fallback)
    assert tp.source == "run" and tp.measured_n == 8
    assert tp.factor_at_measured == pytest.approx(task_grid.RUN_MARGIN * 12.0, rel=0.01)
    assert tp.factor(8) > 2 * fallback.factor(8)
    assert "measured on the run itself" in tp.basis and "4.00 at concurrent=8" in tp.basis  # the fallback named
    plan = make_plan(copy.deepcopy(cfg), cost, BUDGET, parallel=8, throughput=tp)
    slower = make_plan(copy.deepcopy(cfg), cost, BUDGET, parallel=8, throughput=fallback)
    assert check_coverage(cfg, plan) == [] and plan["totals"]["est_s"] < slower["totals"]["est_s"]
    md = task_grid.render_markdown(plan)
    assert "**from the run's own rows**" in md and "| busy period of the run (used) |" in md


def test_a_run_whose_rows_took_as_long_as_estimated_leaves_the_factor_near_todays(grid, tmp_path):
    """Negative control: rows that took what the committed-rows factor predicts give about that factor (only the
    run's margin below it), never more; a run without timed rows gives the fallback itself."""
    cfg, _, _ = grid
    cost, fallback = cost_model(), throughput(4.0)
    run_dir, _ = _done_run(tmp_path, cfg, cost, speedup=4.0)
    tp = task_grid.Throughput.from_run(run_dir, cost, cfg, fallback)
    assert tp.source == "run"
    assert task_grid.RUN_MARGIN * 4.0 - 0.05 <= tp.factor(8) <= 4.0
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "quality.jsonl").write_text("")
    same = task_grid.Throughput.from_run(empty, cost, cfg, fallback)
    assert same.source == "committed" and same.factor(8) == fallback.factor(8) and "no timed rows" in same.basis


# ---- autotuning methods: slices of their own, fewer at once, a larger cap ----------------------------------------
def test_autotuning_methods_get_slices_of_their_own_at_lower_parallel_and_a_larger_timeout(grid, monkeypatch):
    cfg, _, _ = grid
    cfg = {**copy.deepcopy(cfg), "methods": ["sdpa_math", "eager", "fla_delta_rule"]}
    budget = 400.0  # room for fla's 94 s first call
    plan = make_plan(cfg, cost_model(), budget, parallel=8, throughput=throughput())
    assert check_coverage(cfg, plan) == []
    pieces = [p for c in plan["calls"] for p in c["slices"]]
    tuned = [p for p in pieces if "fla_delta_rule" in p["methods"] and p["runs"]]
    assert tuned and all(p["methods"] == ["fla_delta_rule"] for p in tuned)  # not beside other methods
    want_timeout = cfg["case_timeout_s"] + 2 * task_grid.AUTOTUNE_FIRST_CALL_S
    for piece in tuned:
        assert piece["parallel"] == task_grid.AUTOTUNE_PARALLEL < 8 and piece["case_timeout_s"] == want_timeout
        assert piece["overrides"][-2:] == [f"parallel={task_grid.AUTOTUNE_PARALLEL}",
                                           f"case_timeout_s={int(want_timeout)}"]
    others = [p for p in pieces if "fla_delta_rule" not in p["methods"]]
    assert others and all("parallel" not in p and len(p["overrides"]) == 3 for p in others)
    # the slice's overrides compose to what it says
    composed = task_grid.compose_suite("tasks_grid", tuple(tuned[0]["overrides"]))
    assert composed["parallel"] == task_grid.AUTOTUNE_PARALLEL and composed["case_timeout_s"] == want_timeout
    # negative control: with no first call counted as autotuning no slice has its own parallel or cap
    monkeypatch.setattr(task_grid, "AUTOTUNE_SLICE_S", 1e9)
    plain = make_plan(copy.deepcopy(cfg), cost_model(), budget, parallel=8, throughput=throughput())
    assert all("parallel" not in p for c in plain["calls"] for p in c["slices"])
