"""Plan a task-quality grid (``attnbench train``) too large for one device call: split it into calls.

The grid is whatever the train planner (:func:`attnbench.execute.train.build_train_plan`) makes of a suite, for
the target device (``cuda``) on any machine: every (task, method, length, seed) case, runnable or ``unsupported``
with its reason. Each case gets an estimated GPU time from a :class:`CostModel` built from committed H200 runs;
the cases are packed, a (task, method) at a time, into device calls of at most ``budget_s`` estimated seconds.
A call is a list of slices; a slice is one ``attnbench train`` invocation overriding only ``tasks``, ``methods``
and ``seeds`` (every other key is part of each case's id), all writing the one resumable run folder.

:func:`check_coverage` re-expands every slice through the same planner and checks that each case of the grid
that is still to do is run by exactly one slice, that no slice runs a case outside the grid, and that no call
is over its budget. ``done`` (case ids that already have rows in the run folder) drops finished cases: the
plan is then the follow-up of a partial run.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

BUDGET_S = 540.0
"""Estimated GPU seconds per device call (the device tool allows 600 s a command: 60 s of margin)."""
CALL_OVERHEAD_S = 45.0
"""Per call: installing the wheels and the package (scripts/device_tasks.sh's install), then finalizing the
run folder, its report and the tarball. Assumed, not measured apart."""
INVOCATION_OVERHEAD_S = 20.0
"""Per ``attnbench train`` invocation: Python start, torch/Hydra imports, the plan, CUDA/cuDNN initialisation.
From h200-tasks-smoke: its first case took 6.8 s of wall for 2.0 s of training, plus ~10 s of imports."""
MIN_CASE_OVERHEAD_S = 0.5
"""Per case beyond training (model build, evaluation, row): the median wall_s - train_wall_s of the committed
rows (0.12 s in h200-tasks; its first case, 4-5 s, is CUDA initialisation, charged per invocation), at least this."""
AUTOTUNE_FIRST_CALL_S = 94.0
"""Triton autotuning of a flash-linear-attention (``fla``) kernel at its first call on a fresh machine: 60-94 s
on the H200 (commit a5e446f, h200-linear/device-logs). Charged once per (method, task) in each call: fla's
autotuning keys are head counts and widths, not the length, and TRITON_CACHE_AUTOTUNING=1 keeps the result on
the machine's disk for the rest of the call. Other methods pay their first call once per (method, task, length)."""
REFERENCE_WORK = 2048 * 16 * 128
"""tokens x width of the shortest committed kernel call (h200-linear: 2048 tokens, 16 heads of 128): a measured
call is never scaled below what it would cost at this size (smaller calls are launch-bound)."""
KERNEL_RUNS = ("h200-linear", "h200-sparse", "h200-core-v2")
TASK_RUNS = ("h200-tasks", "h200-mqar", "h200-mqar-lr3")
BASELINE = "sdpa_cudnn"


@dataclass
class KernelCost:
    """One method's measured fwd_bwd call beside the baseline's, at one shape of a committed kernel run."""

    method: str
    mask: str
    run: str
    seq: int
    work: int  # batch * seq * heads_q * head_dim of the measured call (tokens x width)
    ms: float
    baseline_ms: float
    compile_s: float  # median first-call (compile) time over the method's rows of that run
    first_call_s: float  # largest first-call time over those rows (a fresh process)

    @property
    def extra_ms(self) -> float:
        return max(0.0, self.ms - self.baseline_ms)


@dataclass
class StepFit:
    """Seconds per training step of ``task`` with the baseline: ``intercept + slope * batch * seq``."""

    intercept: float
    slope: float
    basis: str

    def at(self, tokens: int) -> float:
        return self.intercept + self.slope * tokens


@dataclass
class CostModel:
    """Estimated GPU seconds of one training case on the H200, and what the estimate rests on.

    case seconds = case overhead + the method's first-call time + (steps + eval_batches) * step, where
    step = the task's baseline step (``StepFit``, from committed sdpa_cudnn task runs) + layers * the method's
    extra ms per fwd_bwd attention call over the baseline's (``KernelCost``, from committed kernel runs at their
    shortest length), scaled by the task call's tokens x width over the measured call's, but never below
    ``REFERENCE_WORK`` (small calls are launch-bound: a 2K-token call costs what a 64-token one does). A method
    with no kernel row gets the median extra ms (at ``REFERENCE_WORK``) of the measured methods of its kind
    (exact or approximate). Capped at case_timeout_s (the trainer stops there) plus one step.
    """

    step_fits: dict[str, StepFit]
    default_fit: StepFit
    kernels: dict[tuple[str, str], KernelCost]  # (method, mask) -> cost
    default_extra_ms: dict[bool, float]  # exact? -> median extra ms of measured methods of that kind
    default_compile_s: float
    case_overhead_s: float
    unavailable: dict[str, str] = field(default_factory=dict)  # method -> why it was unavailable on the H200
    sources: list[str] = field(default_factory=list)

    @classmethod
    def from_results(cls, results_dir: Path, kernel_runs=KERNEL_RUNS, task_runs=TASK_RUNS) -> "CostModel":
        import pandas as pd

        results_dir = Path(results_dir)
        sources = []
        kernels: dict[tuple[str, str], KernelCost] = {}
        for run in kernel_runs:
            path = results_dir / run / "rows.parquet"
            if not path.is_file():
                continue
            sources.append(f"{run}/rows.parquet")
            rows = pd.read_parquet(path)
            ok = rows[(rows["status"] == "ok") & (rows["mode"] == "fwd_bwd")]
            for mask, by_mask in ok.groupby("mask"):
                base = by_mask[by_mask["method"] == BASELINE]
                for method, group in by_mask.groupby("method"):
                    merged = group.merge(base, on=["seq_q", "seq_kv", "batch", "heads_q", "head_dim"],
                                         suffixes=("", "_base"))
                    if merged.empty:
                        continue
                    first = merged.sort_values("seq_q").iloc[0]
                    compile_times = [float(x) for x in rows[rows["method"] == method]["compile_s"].dropna()]
                    cost = KernelCost(method, str(mask), run, int(first["seq_q"]),
                                      int(first["batch"] * first["seq_kv"] * first["heads_q"] * first["head_dim"]),
                                      float(first["ms_median"]), float(first["ms_median_base"]),
                                      statistics.median(compile_times) if compile_times else 0.0,
                                      max(compile_times) if compile_times else 0.0)
                    known = kernels.get((method, str(mask)))
                    if known is None or cost.work < known.work:  # the shortest measured call: nearest the tasks
                        kernels[(method, str(mask))] = cost
        unavailable = {}
        for path in sorted(results_dir.glob("h200*/rows.parquet")):
            rows = pd.read_parquet(path, columns=["method", "status", "reason"])
            gone = rows[(rows["status"] == "unsupported") & rows["reason"].fillna("").str.startswith("method unavailable")]
            for method, reason in gone.groupby("method")["reason"].first().items():
                unavailable.setdefault(str(method), f"{reason} (in {path.parent.name})")
        step_rows, overheads = [], []
        for run in task_runs:
            path = results_dir / run / "quality.parquet"
            if not path.is_file():
                continue
            sources.append(f"{run}/quality.parquet")
            rows = pd.read_parquet(path)
            rows = rows[(rows["method"] == BASELINE) & (rows["status"] == "ok") & (rows["steps_done"] > 0)]
            if "concurrent" in rows:  # a row trained beside others (parallel=N) is slower than the serial estimate
                rows = rows[~(pd.to_numeric(rows["concurrent"], errors="coerce").astype(float) > 1)]
            for row in rows.itertuples():
                step_rows.append((row.task, int(row.batch) * int(row.seq), row.train_wall_s / row.steps_done, run))
                overheads.append(float(row.wall_s) - float(row.train_wall_s))
        step_fits = {}
        for task in sorted({r[0] for r in step_rows}):
            points = sorted({(tokens, step) for name, tokens, step, _ in step_rows if name == task})
            runs = sorted({run for name, *_, run in step_rows if name == task})
            step_fits[task] = _fit(points, f"{len(points)} committed {BASELINE} row(s) of {', '.join(runs)}")
        fitted = [fit for fit in step_fits.values() if "least squares" in fit.basis]
        default_fit = StepFit(max((f.intercept for f in fitted), default=0.015),
                              max((f.slope for f in fitted), default=1e-6),
                              "no committed row of the task: the largest intercept and slope of the tasks fitted "
                              "on two lengths")
        extra = {True: [], False: []}
        from attnbench.methods import METHODS

        for (method, _), cost in kernels.items():
            if method in METHODS and method != BASELINE:
                extra[METHODS[method].caps.exact].append(cost.extra_ms * REFERENCE_WORK / cost.work)
        defaults = {kind: statistics.median(values) if values else 3.0 for kind, values in extra.items()}
        compile_all = [cost.compile_s for cost in kernels.values()]
        return cls(step_fits, default_fit, kernels, defaults,
                   statistics.median(compile_all) if compile_all else 1.0,
                   max(MIN_CASE_OVERHEAD_S, statistics.median(overheads) if overheads else 0.0), unavailable,
                   sources)

    def kernel(self, method: str, mask: str) -> KernelCost | None:
        other = "full" if mask == "causal" else "causal"
        return self.kernels.get((method, mask)) or self.kernels.get((method, other))

    def step_seconds(self, case) -> tuple[float, str]:
        """Seconds per training step of ``case`` (a TrainCase) on the H200, and the basis of the figure."""
        from attnbench.methods import METHODS
        from attnbench.tasks import TASKS

        params = case.params
        tokens = int(params["batch"]) * case.seq
        fit = self.step_fits.get(case.task, self.default_fit)
        mask = TASKS[case.task].cls.pattern.startswith("causal") and "causal" or "full"
        cost = self.kernel(case.method, mask)
        work = tokens * int(params["d_model"])
        if case.method == BASELINE:
            extra_ms, basis = 0.0, "baseline"
        elif cost is not None:
            extra_ms = cost.extra_ms * max(work, REFERENCE_WORK) / cost.work
            basis = f"{cost.run} {cost.mask} fwd_bwd at {cost.seq}: {cost.ms:.2f} ms vs {cost.baseline_ms:.2f}"
        else:
            exact = METHODS[case.method].caps.exact if case.method in METHODS else False
            extra_ms = self.default_extra_ms[exact] * max(work, REFERENCE_WORK) / REFERENCE_WORK
            basis = f"no kernel row: median extra of measured {'exact' if exact else 'approximate'} methods"
        return fit.at(tokens) + int(params["layers"]) * extra_ms / 1000.0, basis

    def first_call(self, case) -> tuple[tuple, float]:
        """(key, seconds): compile or autotune of a fresh process, paid once per key in a call."""
        from attnbench.methods import METHODS

        spec = METHODS.get(case.method)
        if spec is not None and "fla" in spec.caps.requires:
            return (case.method, case.task), AUTOTUNE_FIRST_CALL_S
        cost = self.kernel(case.method, "causal")
        return (case.method, case.task, case.seq), cost.first_call_s if cost is not None else self.default_compile_s

    def case_seconds(self, case, timeout_s: float) -> float:
        """Estimated seconds of one runnable case, first call excluded (see ``first_call``)."""
        if case.method in self.unavailable:
            return 0.0
        params = case.params
        step, _ = self.step_seconds(case)
        steps = int(params["steps"]) + int(params.get("eval_batches", 0))
        return self.case_overhead_s + min(steps * step, timeout_s + step)


def _fit(points: list[tuple[int, float]], basis: str) -> StepFit:
    if len({tokens for tokens, _ in points}) >= 2:
        n = len(points)
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        var = sum((x - mean_x) ** 2 for x, _ in points)
        slope = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in points) / var)
        intercept = max(0.0, mean_y - slope * mean_x)
        return StepFit(intercept, slope, f"least squares over {basis}")
    tokens = points[0][0]
    step = sum(s for _, s in points) / len(points)
    intercept = min(step, 0.007)  # one point: an assumed 7 ms of per-step overhead (h200-tasks' shortest steps)
    return StepFit(intercept, (step - intercept) / tokens, f"one point ({basis}), 7 ms per-step overhead assumed")


# ---- the grid and its plan ------------------------------------------------------------------------------------
def compose_suite(suite: str = "tasks_grid", overrides: tuple[str, ...] = ()) -> dict:
    """The plain config ``attnbench train suite=<suite> <overrides>`` would run (the same Hydra composition)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from attnbench import conf

    with initialize_config_dir(config_dir=str(Path(conf.__file__).resolve().parent), version_base="1.3",
                               job_name="attnbench_task_grid"):
        cfg = compose(config_name="train", overrides=[f"suite={suite}", *overrides])
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return plain


def grid_cases(cfg: dict, target_device: str = "cuda"):
    """Every case of ``cfg`` as planned for ``target_device`` (method availability left to that machine):
    ``[(case, None | unsupported reason)]`` in the planner's order."""
    import attnbench.tasks  # noqa: F401  (the built-in tasks)
    from attnbench.config.plugins import load_plugins
    from attnbench.execute.train import build_train_plan

    load_plugins(cfg.get("plugins") or [])
    plan = build_train_plan(cfg, target_device=target_device, check_availability=False)
    return [(case, None) for case in plan.runnable] + list(plan.unsupported)


def slice_config(cfg: dict, piece: dict) -> dict:
    return {**cfg, "tasks": list(piece["tasks"]), "methods": list(piece["methods"]), "seeds": list(piece["seeds"])}


def slice_overrides(piece: dict) -> list[str]:
    """The ``attnbench train`` overrides of a slice (Hydra list syntax)."""
    return [f"{key}=[{','.join(str(v) for v in piece[key])}]" for key in ("tasks", "methods", "seeds")]


def done_case_ids(run_dir: Path, retry: tuple[str, ...] = ()) -> set[str]:
    """Case ids with a row in ``run_dir`` (the resume set of ``attnbench train`` with the same ``retry``)."""
    from attnbench.record.quality import QualityStore

    return set(QualityStore(Path(run_dir), retry=tuple(retry)).done)


def make_plan(cfg: dict, cost: CostModel, budget_s: float = BUDGET_S, done: set[str] | None = None,
              suite: str = "tasks_grid", run_id: str = "h200-task-grid", target_device: str = "cuda") -> dict:
    """Pack the grid's cases still to do into calls of at most ``budget_s`` estimated seconds (a JSON-able dict)."""
    done = set(done or ())
    timeout_s = float(cfg.get("case_timeout_s", 600))
    cases = grid_cases(cfg, target_device)
    grid_ids = {case.case_id for case, _ in cases}
    entries = {}
    units: dict[tuple[str, str], list[dict]] = {}  # (task, method) -> its cases, planner order
    for case, reason in cases:
        if case.method in cost.unavailable and reason is None:
            planned, why, est = "unsupported", f"expected: {cost.unavailable[case.method]}", 0.0
        elif reason is not None:
            planned, why, est = "unsupported", reason, 0.0
        else:
            planned, why, est = "run", None, cost.case_seconds(case, timeout_s)
        entry = {"case_id": case.case_id, "task": case.task, "method": case.method, "seq": case.seq,
                 "seed": case.seed, "planned": planned, "reason": why, "est_s": round(est, 2),
                 "done": case.case_id in done, "call": None}
        if planned == "run":
            key, seconds = cost.first_call(case)
            entry["first_call"] = ["/".join(str(k) for k in key), round(seconds, 2)]
        entries[case.case_id] = entry
        units.setdefault((case.task, case.method), []).append(entry)

    calls: list[dict] = []

    def unit_cost(items: list[dict], call: dict) -> float:
        first = {e["first_call"][0]: e["first_call"][1] for e in items if e["planned"] == "run"}
        return sum(e["est_s"] for e in items) + sum(s for key, s in first.items() if key not in call["first_calls"])

    def new_call() -> dict:
        call = {"index": len(calls), "est_s": CALL_OVERHEAD_S, "slices": [], "first_calls": set()}
        calls.append(call)
        return call

    def place(call: dict, piece: dict | None, task: str, method: str, seeds: list[int], part: list[dict],
              added: float) -> None:
        if piece is None:
            piece = {"tasks": [task], "methods": [], "seeds": seeds, "est_s": 0.0, "runs": 0, "unsupported": 0}
            call["slices"].append(piece)
        piece["methods"].append(method)
        piece["est_s"] += added
        call["est_s"] += added
        for e in part:
            e["call"] = call["index"]
            piece["runs" if e["planned"] == "run" else "unsupported"] += 1
            if e["planned"] == "run":
                call["first_calls"].add(e["first_call"][0])

    def find(task: str, seeds: list[int], among: list[dict]) -> tuple[dict, dict] | None:
        for call in among:
            for piece in call["slices"]:
                if piece["tasks"] == [task] and piece["seeds"] == seeds:
                    return call, piece
        return None

    pending = {key: [e for e in items if not e["done"]] for key, items in units.items()}
    pending = {key: items for key, items in pending.items() if items}
    runs_first = [key for key, items in pending.items() if any(e["planned"] == "run" for e in items)]
    only_unsupported = [key for key in pending if key not in runs_first]
    call = None
    for task, method in runs_first:  # (task, method) at a time, in the planner's order
        todo = pending[(task, method)]
        seeds_all = sorted({e["seed"] for e in todo})
        call = call or new_call()
        alone = unit_cost(todo, {"first_calls": set()}) + INVOCATION_OVERHEAD_S + CALL_OVERHEAD_S
        groups = [[seed] for seed in seeds_all] if alone > budget_s else [seeds_all]  # over a call: seed by seed
        for seeds in groups:
            part = [e for e in todo if e["seed"] in seeds]
            found = find(task, seeds, [call])
            added = unit_cost(part, call) + (0.0 if found else INVOCATION_OVERHEAD_S)
            if call["est_s"] + added > budget_s and call["slices"]:
                call, found = new_call(), None
                added = unit_cost(part, call) + INVOCATION_OVERHEAD_S
            place(call, found[1] if found else None, task, method, seeds, part, added)
    for task, method in only_unsupported:  # no GPU time: joined to a slice of the same task and seeds
        todo = pending[(task, method)]
        seeds = sorted({e["seed"] for e in todo})
        found = find(task, seeds, calls)
        if found is None:
            call = call or new_call()
            if call["est_s"] + INVOCATION_OVERHEAD_S > budget_s:
                call = new_call()
            place(call, None, task, method, seeds, todo, INVOCATION_OVERHEAD_S)
        else:
            place(found[0], found[1], task, method, seeds, todo, 0.0)
    for call in calls:
        call.pop("first_calls")
        call["est_s"] = round(call["est_s"], 1)
        for piece in call["slices"]:
            piece["est_s"] = round(piece["est_s"], 1)
            piece["overrides"] = slice_overrides(piece)
    todo = [e for e in entries.values() if not e["done"]]
    method_task: dict[tuple[str, str], float] = {}
    for e in entries.values():
        if e["planned"] == "run":
            method_task[(e["task"], e["method"])] = method_task.get((e["task"], e["method"]), 0.0) + e["est_s"]
    return {
        "suite": suite, "run_id": run_id, "target_device": target_device, "budget_s": budget_s,
        "case_timeout_s": timeout_s,
        "assumptions": {"call_overhead_s": CALL_OVERHEAD_S, "invocation_overhead_s": INVOCATION_OVERHEAD_S,
                        "case_overhead_s": round(cost.case_overhead_s, 2),
                        "autotune_first_call_s": AUTOTUNE_FIRST_CALL_S,
                        "default_extra_ms": {"exact": round(cost.default_extra_ms[True], 3),
                                             "approximate": round(cost.default_extra_ms[False], 3)},
                        "default_compile_s": round(cost.default_compile_s, 2), "sources": cost.sources,
                        "step_fits": {t: {"intercept_ms": round(f.intercept * 1e3, 3),
                                          "slope_us_per_token": round(f.slope * 1e6, 5), "basis": f.basis}
                                      for t, f in {**cost.step_fits, "(default)": cost.default_fit}.items()}},
        "totals": {"cases": len(entries), "done": len(entries) - len(todo),
                   "to_run": sum(e["planned"] == "run" for e in todo),
                   "unsupported": sum(e["planned"] == "unsupported" for e in todo),
                   "calls": len(calls), "est_s": round(sum(c["est_s"] for c in calls), 1)},
        "method_task_est_s": {f"{t}/{m}": round(s, 1) for (t, m), s in sorted(method_task.items())},
        "grid_ids": len(grid_ids),
        "calls": calls,
        "cases": list(entries.values()),
    }


def check_coverage(cfg: dict, plan: dict, done: set[str] | None = None, target_device: str = "cuda") -> list[str]:
    """Problems with ``plan`` (empty: none). Each case of the grid not in ``done`` must be run by exactly one
    slice (its slice's ``attnbench train`` plan, re-expanded through the planner, holds it), no slice may hold a
    case outside the grid, every planned-unsupported case must be unsupported in its slice's plan too, and no
    call may be estimated over the plan's budget."""
    done = set(done or ())
    grid = {case.case_id: reason for case, reason in grid_cases(cfg, target_device)}
    problems = []
    seen: dict[str, list[int]] = {}
    for call in plan["calls"]:
        if call["est_s"] > plan["budget_s"] + 1e-6:
            problems.append(f"call {call['index']}: estimated {call['est_s']} s, over the budget {plan['budget_s']} s")
        for piece in call["slices"]:
            for case, reason in grid_cases(slice_config(cfg, piece), target_device):
                if case.case_id not in grid:
                    problems.append(f"call {call['index']}: {case.task}/{case.method}/{case.seq}/s{case.seed} "
                                    f"is not a case of the grid")
                    continue
                if (reason is None) != (grid[case.case_id] is None):
                    problems.append(f"{case.task}/{case.method}/{case.seq}/s{case.seed}: planned differently "
                                    f"in its slice than in the grid")
                if case.case_id not in done:
                    seen.setdefault(case.case_id, []).append(call["index"])
    names = {e["case_id"]: f"{e['task']}/{e['method']}/{e['seq']}/s{e['seed']}" for e in plan.get("cases", [])}
    for case_id in grid:
        if case_id in done:
            continue
        calls = seen.get(case_id, [])
        if not calls:
            problems.append(f"{names.get(case_id, case_id)}: in no call (dropped)")
        elif len(calls) > 1:
            problems.append(f"{names.get(case_id, case_id)}: in {len(calls)} slices (calls {calls})")
    return problems


CASE_FIELDS = ("case_id", "task", "method", "seq", "seed", "planned", "reason", "est_s", "done", "call", "first_call")


def to_json(plan: dict) -> str:
    """The plan as compact JSON: cases as rows of ``CASE_FIELDS``, reasons interned in ``reasons``."""
    reasons = sorted({e["reason"] for e in plan["cases"] if e["reason"]})
    index = {reason: i for i, reason in enumerate(reasons)}
    rows = [[index.get(e[f]) if f == "reason" else e.get(f) for f in CASE_FIELDS] for e in plan["cases"]]
    body = {**plan, "case_fields": list(CASE_FIELDS), "reasons": reasons, "cases": rows}
    return json.dumps(body, separators=(",", ":")) + "\n"


def load_plan(path: Path) -> dict:
    """A plan written by :func:`to_json`, cases as dicts again."""
    plan = json.loads(Path(path).read_text())
    fields, reasons = plan.pop("case_fields"), plan.pop("reasons")
    cases = []
    for row in plan["cases"]:
        entry = dict(zip(fields, row))
        entry["reason"] = None if entry["reason"] is None else reasons[entry["reason"]]
        cases.append(entry)
    plan["cases"] = cases
    return plan


def render_markdown(plan: dict) -> str:
    totals = plan["totals"]
    a = plan["assumptions"]
    lines = [f"# Task grid plan: `attnbench train suite={plan['suite']}` on one H200, run `{plan['run_id']}`", "",
             "Written by `scripts/plan_task_grid.py` (no GPU): the grid comes from the train planner itself; "
             "every (task, method, length, seed) case is in exactly one call (checked by "
             "`attnbench.execute.task_grid.check_coverage`). Run call i with `scripts/device_task_grid.sh i`; "
             "re-plan the rest with `--done results/" + plan["run_id"] + "`.", "",
             f"- cases: {totals['cases']} ({totals['done']} already done), to run: {totals['to_run']}, "
             f"planned unsupported rows: {totals['unsupported']}",
             f"- device calls: **{totals['calls']}** of at most {plan['budget_s']:.0f} s estimated each; estimated "
             f"total **{totals['est_s'] / 60:.1f} GPU minutes** ({totals['est_s'] / 3600:.2f} h; at 30 minutes "
             f"of device time a session, ~{math.ceil(totals['est_s'] / 1800)} sessions)",
             f"- case_timeout_s: {plan['case_timeout_s']:.0f} (a run past it is a `timeout` row with its steps)", "",
             "## Cost model (assumptions)", "",
             "case s = case overhead + (steps + eval batches) x step s (capped at case_timeout_s + one step); "
             "step s = the task's baseline (sdpa_cudnn) step, fitted on committed task runs as intercept + "
             "slope x batch x length, + layers x the method's extra ms per fwd_bwd attention call over "
             "sdpa_cudnn at the shortest length of a committed kernel run, scaled by (task call work / "
             "measured call work, never below 2048 x 16 x 128) (work = tokens x width); plus, once per (method, task, "
             "length) in a call, the method's first-call time (its largest compile_s in the kernel runs).",
             "",
             f"- per call {a['call_overhead_s']:.0f} s (install, finalize, report), per invocation "
             f"{a['invocation_overhead_s']:.0f} s, per case {a['case_overhead_s']:.2f} s (median wall_s - "
             f"train_wall_s of the committed rows, at least 0.5 s), fla first call (Triton autotuning) "
             f"{a['autotune_first_call_s']:.0f} s once per (method, task) in a call",
             f"- a method without kernel rows: extra {a['default_extra_ms']['exact']:.3f} ms (exact) / "
             f"{a['default_extra_ms']['approximate']:.3f} ms (approximate) per call at 2048 x 16 x 128 tokens x width, "
             f"first call {a['default_compile_s']:.2f} s (medians of the measured methods)",
             f"- sources: {', '.join(a['sources'])}", "",
             "| task | baseline step intercept (ms) | slope (µs / token) | basis |", "|---|---|---|---|"]
    for task, fit in a["step_fits"].items():
        lines.append(f"| {task} | {fit['intercept_ms']:.2f} | {fit['slope_us_per_token']:.4f} | {fit['basis']} |")
    over = {k: v for k, v in plan["method_task_est_s"].items() if v > 120}
    lines += ["", f"## Method-tasks estimated over 2 minutes ({len(over)} of {len(plan['method_task_est_s'])})", ""]
    lines += [", ".join(f"`{k}` {v / 60:.1f} min" for k, v in sorted(over.items(), key=lambda kv: -kv[1]))
              or "none"]
    reasons: dict[str, int] = {}
    for e in plan["cases"]:
        if e["planned"] == "unsupported" and not e["done"]:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    lines += ["", "## Planned unsupported rows (written by the slice that holds them)", "",
              "| cases | reason |", "|---|---|"]
    lines += [f"| {n} | {r} |" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    lines += ["", "## Calls", "", "| call | est. s | slice (`attnbench train suite=" + plan["suite"] + " ...`) | "
              "runs | unsupported | est. s |", "|---|---|---|---|---|---|"]
    for call in plan["calls"]:
        for j, piece in enumerate(call["slices"]):
            head = f"| {call['index']} | {call['est_s']:.0f} " if j == 0 else "| | "
            lines.append(f"{head}| `{' '.join(piece['overrides'])}` | {piece['runs']} | {piece['unsupported']} | "
                         f"{piece['est_s']:.0f} |")
    return "\n".join(lines) + "\n"
