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
on the H200 (commit a5e446f, h200-linear/device-logs). Charged once per (method, heads, head width, dtype) in
each call: fla's autotuning keys are head counts and widths, not the length nor the batch (so tasks of the same
attention shape share it), and TRITON_CACHE_AUTOTUNING=1 keeps the result on the machine's disk for the rest of
the call, for every worker and invocation. Other methods pay their first call once per (method, task, length)."""
AUTOTUNE_SLICE_S = 60.0
"""A method whose first call is this long or longer (fla's Triton autotuning) gets slices of its own, at most
``AUTOTUNE_PARALLEL`` cases at once and a larger case cap (:func:`autotune_profile`)."""
AUTOTUNE_PARALLEL = 4
"""Cases at once in an autotuning slice (the H200 machine has 16 CPU cores for the workers' compiles)."""
REFERENCE_WORK = 2048 * 16 * 128
"""tokens x width of the shortest committed kernel call (h200-linear: 2048 tokens, 16 heads of 128): a measured
call is never scaled below what it would cost at this size (smaller calls are launch-bound)."""
KERNEL_RUNS = ("h200-linear", "h200-sparse", "h200-core-v2")
TASK_RUNS = ("h200-tasks", "h200-mqar", "h200-mqar-lr3")
BASELINE = "sdpa_cudnn"
CONTENTION_RUNS = ("h200-analysis-hybrid-v2", "h200-analysis-state-long", "h200-analysis-tasks-v2")
"""Committed H200 task runs trained with ``parallel=N`` (rows with ``concurrent`` = N > 1): the throughput fit."""
EXACT_FUSED = ("sdpa_cudnn", "sdpa_efficient", "sdpa_flash")
"""Fused exact kernels: a row of one at concurrency N beside a serial sdpa_cudnn row of the same shape is a direct
cross-check of the factor (the same model up to the kernel)."""
THROUGHPUT_QUANTILE = 0.25
"""The fitted factor is this quantile of the per-row factors (not their median: the slow rows count)..."""
THROUGHPUT_MARGIN = 0.75
"""... times this safety margin (the rows are tiny launch-bound models in float32; the grid is bf16)."""
RUN_MARGIN = 0.85
"""Safety margin on the factor measured on the run's own rows (``Throughput.from_run``: the same grid, dtype and
machine, so a smaller margin than ``THROUGHPUT_MARGIN`` on other runs' rows)."""
RUN_MIN_TRAIN_SHARE = 0.5
"""A busy period of the run whose charged first calls (compile, autotuning) leave less than this share of its
span for training is not used for the fit: it measures the first calls, not the throughput."""


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
        params = case.params
        return self.shape_step_seconds(case.task, case.method, int(params["batch"]) * case.seq,
                                       int(params["d_model"]), int(params["layers"]))

    def shape_step_seconds(self, task: str, method: str, tokens: int, d_model: int, layers: int) -> tuple[float, str]:
        """:meth:`step_seconds` of a model given by its shape (tokens = batch x length): also for measured rows."""
        from attnbench.methods import METHODS
        from attnbench.tasks import TASKS

        fit = self.step_fits.get(task, self.default_fit)
        pattern = TASKS[task].cls.pattern if task in TASKS else "causal"
        mask = pattern.startswith("causal") and "causal" or "full"
        cost = self.kernel(method, mask)
        work = tokens * d_model
        if method == BASELINE:
            extra_ms, basis = 0.0, "baseline"
        elif cost is not None:
            extra_ms = cost.extra_ms * max(work, REFERENCE_WORK) / cost.work
            basis = f"{cost.run} {cost.mask} fwd_bwd at {cost.seq}: {cost.ms:.2f} ms vs {cost.baseline_ms:.2f}"
        else:
            exact = METHODS[method].caps.exact if method in METHODS else False
            extra_ms = self.default_extra_ms[exact] * max(work, REFERENCE_WORK) / REFERENCE_WORK
            basis = f"no kernel row: median extra of measured {'exact' if exact else 'approximate'} methods"
        return fit.at(tokens) + layers * extra_ms / 1000.0, basis

    def first_call(self, case) -> tuple[tuple, float]:
        """(key, seconds): compile or autotune of a fresh process, paid once per key in a call."""
        from attnbench.methods import METHODS

        spec = METHODS.get(case.method)
        if spec is not None and "fla" in spec.caps.requires:
            params = case.params
            heads = int(params["heads"])
            return (case.method, f"h{heads}", f"d{int(params['d_model']) // heads}", case.dtype), AUTOTUNE_FIRST_CALL_S
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



@dataclass
class Throughput:
    """How much more serial-estimated work N cases at once on the one GPU (``attnbench train parallel=N``) get
    through per wall second than one at a time: ``factor(N)``, fitted on committed rows trained at concurrency
    ``measured_n``.

    Each such row (status ok, steps done, of a task with a committed serial step fit) gives
    ``measured_n x (the cost model's serial step of its shape and method) / (its measured train_wall_s /
    steps_done)``, clipped to [1, measured_n]; the factor at ``measured_n`` is the ``THROUGHPUT_QUANTILE``
    quantile of those, times ``THROUGHPUT_MARGIN``. Between 1 and ``measured_n`` the per-case slowdown
    (N / factor) is interpolated linearly from 1 (one case alone); past ``measured_n`` no further gain is
    assumed (the factor stays at ``factor(measured_n)``). No rows: serial (factor 1 at every N)."""

    measured_n: int
    factor_at_measured: float
    rows: int
    basis: str
    row_factors: dict[str, float] = field(default_factory=dict)  # "run task/method/seq[ schedule] #row" -> factor
    pairs: list[str] = field(default_factory=list)  # cross-check: rows of the same shape as a serial baseline row
    source: str = "committed"  # committed: other runs' rows (from_results); run: the grid's own run (from_run)

    @classmethod
    def serial(cls, why: str = "no contention rows: serial estimates") -> "Throughput":
        return cls(1, 1.0, 0, why)

    @classmethod
    def from_results(cls, results_dir: Path, cost: CostModel, runs=CONTENTION_RUNS,
                     task_runs=TASK_RUNS) -> "Throughput":
        import pandas as pd

        results_dir = Path(results_dir)
        shape = ["task", "seq", "batch", "d_model", "layers", "heads"]
        serial_rows = []
        for run in task_runs:
            path = results_dir / run / "quality.parquet"
            if path.is_file():
                rows = pd.read_parquet(path)
                rows = rows[(rows["method"] == BASELINE) & (rows["status"] == "ok") & (rows["steps_done"] > 0)]
                if "concurrent" in rows:
                    rows = rows[~(pd.to_numeric(rows["concurrent"], errors="coerce").astype(float) > 1)]
                serial_rows.append(rows.assign(run=run))
        serial = pd.concat(serial_rows) if serial_rows else None
        pairs = []
        found: dict[int, dict[str, float]] = {}
        used_runs = []
        for run in runs:
            path = results_dir / run / "quality.parquet"
            if not path.is_file():
                continue
            rows = pd.read_parquet(path)
            if "concurrent" not in rows:
                continue
            rows = rows[(rows["status"] == "ok") & (pd.to_numeric(rows["steps_done"], errors="coerce") > 0)]
            rows = rows[pd.to_numeric(rows["concurrent"], errors="coerce").fillna(1).astype(int) > 1]
            rows = rows[rows["task"].isin(list(cost.step_fits))]  # a serial step of the task was measured
            if rows.empty:
                continue
            used_runs.append(run)
            for row in rows.itertuples():
                n = int(row.concurrent)
                serial_s, _ = cost.shape_step_seconds(str(row.task), str(row.method), int(row.batch) * int(row.seq),
                                                      int(row.d_model), int(row.layers))
                measured = float(row.train_wall_s) / int(row.steps_done)
                schedule = ""
                if isinstance(row.model_options, str) and row.model_options not in ("", "{}"):
                    schedule = " " + row.model_options
                key = f"{run} {row.task}/{row.method}/{row.seq}{schedule} #{row.Index}"
                found.setdefault(n, {})[key] = min(float(n), max(1.0, n * serial_s / measured))
                if serial is not None and row.method in EXACT_FUSED:
                    same = serial
                    for column in shape:
                        same = same[same[column].astype(str) == str(getattr(row, column))]
                    for match in same.itertuples():
                        step = float(match.train_wall_s) / int(match.steps_done)
                        pairs.append(f"{row.task} {row.seq} x batch {row.batch}, d_model {row.d_model}: serial "
                                     f"{BASELINE} {step * 1e3:.1f} ms a step ({match.run}), {row.method}{schedule} "
                                     f"{measured * 1e3:.1f} ms at concurrent={n} ({run}): {n * step / measured:.2f}")
        if not found:
            return cls.serial()
        n = max(found, key=lambda k: (len(found[k]), k))  # the concurrency with the most rows
        values = sorted(found[n].values())
        quantile = _quantile(values, THROUGHPUT_QUANTILE)
        factor = max(1.0, quantile * THROUGHPUT_MARGIN)
        tasks = sorted({key.split(" ", 1)[1].split("/", 1)[0] for key in found[n]})
        basis = (f"{len(values)} ok row(s) at concurrent={n} of {', '.join(used_runs)} (tasks {', '.join(tasks)}: "
                 f"those with a committed serial {BASELINE} step fit); per row {n} x the cost model's serial step / "
                 f"the measured train_wall_s / steps_done, clipped to [1, {n}]: median "
                 f"{statistics.median(values):.2f}, min {values[0]:.2f}, max {values[-1]:.2f}; the "
                 f"{THROUGHPUT_QUANTILE:.0%} quantile {quantile:.2f} x safety margin {THROUGHPUT_MARGIN} = "
                 f"{factor:.2f}")
        return cls(n, factor, len(values), basis, found[n], pairs)

    @classmethod
    def from_run(cls, run_dir: Path, cost: CostModel, cfg: dict, fallback: "Throughput",
                 target_device: str = "cuda") -> "Throughput":
        """The factor measured on the rows earlier calls wrote to the grid's own run folder (``--done RUN``),
        or ``fallback`` (with the reason in its basis) when it has no usable rows.

        The rows (each with ``started_at``, ``wall_s`` and ``concurrent``) are merged into busy periods: runs of
        cases whose [start, start + wall_s] intervals overlap, i.e. one ``attnbench train`` invocation's cases
        from its first start to its last end (invocations are separated by their start-up). For a period the
        plan's own formula is wall = first calls + serial / factor, so its measured factor is the serial
        estimate of its cases (the cost model's, from each row's shape and steps_done: what the row actually
        trained) over its span less its first calls (each key charged once, as in a call). Unsupported rows
        cost nothing. Periods whose first calls take more than half the span (RUN_MIN_TRAIN_SHARE) are left out,
        and so are periods at another concurrency than the most-used one. The factor at that concurrency is
        ``RUN_MARGIN`` x (sum of serial / sum of (span - first calls)) over the periods used."""
        import datetime as dt

        from attnbench.execute.train import TrainCase
        from attnbench.record.quality import read_jsonl

        rows = read_jsonl(Path(run_dir) / "quality.jsonl")
        grid = {case.case_id: case for case, _ in grid_cases(cfg, target_device)}
        timeout_s = float(cfg.get("case_timeout_s", 600))
        spans = []
        for row in rows:
            if row.get("status") == "unsupported" or not row.get("started_at") or row.get("wall_s") is None:
                continue
            try:
                start = dt.datetime.fromisoformat(str(row["started_at"])).timestamp()
            except ValueError:
                continue
            case = grid.get(row.get("case_id"))
            if case is None:  # a row of other parameters: its shape from the row itself
                params = {key: row.get(key) for key in ("batch", "d_model", "layers", "heads", "steps")}
                if any(value is None for value in params.values()):
                    continue
                case = TrainCase(str(row["task"]), str(row["method"]), int(row["seq"]), int(row.get("seed") or 0),
                                 str(row.get("dtype") or "bfloat16"), json.dumps(params, sort_keys=True))
            params = case.params
            step, _ = cost.step_seconds(case)
            steps = int(row.get("steps_done") or 0)
            if row.get("status") == "ok":
                steps += int(params.get("eval_batches", 0))
            serial = 0.0 if case.method in cost.unavailable else cost.case_overhead_s + min(steps * step,
                                                                                             timeout_s + step)
            key, first = cost.first_call(case)
            spans.append((start, start + float(row["wall_s"]), int(row.get("concurrent") or 1), serial, key, first,
                          f"{case.task}/{case.method}/{case.seq}/s{case.seed}"))
        periods = []
        for item in sorted(spans):
            if periods and item[0] <= periods[-1]["end"] + 1.0:  # started_at has whole seconds
                period = periods[-1]
            else:
                period = {"start": item[0], "end": item[1], "items": []}
                periods.append(period)
            period["end"] = max(period["end"], item[1])
            period["items"].append(item)
        if not periods:
            return dataclasses_replace(fallback, basis=f"{fallback.basis} (the run {Path(run_dir).name} has no "
                                                       "timed rows yet: this derivation is used)")
        by_n: dict[int, float] = {}
        for period in periods:
            period["n"] = max(item[2] for item in period["items"])
            firsts = dict((item[4], item[5]) for item in period["items"])  # each key once, as in a call
            period["first"] = sum(v for v in firsts.values() if v >= AUTOTUNE_SLICE_S)  # autotuning: in full
            period["work"] = (sum(item[3] for item in period["items"])  # training and the other first calls
                              + sum(v for v in firsts.values() if v < AUTOTUNE_SLICE_S))
            period["span"] = period["end"] - period["start"]
            by_n[period["n"]] = by_n.get(period["n"], 0.0) + period["work"]
        n = max(by_n, key=lambda k: (by_n[k], k))
        used, left = [], []
        for period in periods:
            train = period["span"] - period["first"]
            ok = period["n"] == n and period["work"] > 0 and train >= RUN_MIN_TRAIN_SHARE * period["span"]
            (used if ok else left).append(period)
        name = Path(run_dir).name
        if n <= 1 or not used:
            why = (f"rows at concurrent={n}" if n <= 1 else
                   f"none of its {len(periods)} busy period(s) at concurrent={n} is mostly training")
            return dataclasses_replace(fallback, basis=f"{fallback.basis} (the run {name}: {why}: this derivation "
                                                       "is used)")
        serial = sum(p["work"] for p in used)
        train = sum(p["span"] - p["first"] for p in used)
        measured = serial / train
        factor = max(1.0, RUN_MARGIN * measured)

        def label(period) -> str:
            stamp = dt.datetime.fromtimestamp(period["start"], dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            methods = sorted({item[6].split("/")[1] for item in period["items"]})
            return (f"{stamp} +{period['span']:.0f} s, {len(period['items'])} rows ({', '.join(methods[:6])}"
                    f"{', ...' if len(methods) > 6 else ''})")

        row_factors = {label(p): round(p["work"] / (p["span"] - p["first"]), 3) for p in used}
        rows_used = sum(len(p["items"]) for p in used)
        basis = (f"measured on the run itself ({name}, {rows_used} timed rows in {len(used)} busy period(s) at "
                 f"concurrent={n}): per period (one invocation's cases, first start to last end) the cost model's "
                 f"serial estimate of what its rows trained (their steps_done) plus their first calls (compiles; "
                 f"each key once) over its span less its autotuning first calls (>= {AUTOTUNE_SLICE_S:.0f} s, "
                 f"charged in full); in all {serial:.0f} s of serial estimate in {train:.0f} s = {measured:.2f}, "
                 f"x safety margin {RUN_MARGIN} = {factor:.2f}. With this factor a slice's compiles are divided by "
                 "it like its training (they ran side by side in the workers), autotuning is charged in full")
        if left:
            basis += (f"; {len(left)} period(s) left out (another concurrency, or autotuning over "
                      f"{1 - RUN_MIN_TRAIN_SHARE:.0%} of the span): " + "; ".join(
                          f"{label(p)}: autotuning {p['first']:.0f} s, concurrent={p['n']}" for p in left))
        basis += (f". Without the run's rows the factor would be {fallback.factor_at_measured:.2f} at "
                  f"concurrent={fallback.measured_n} ({fallback.basis})")
        return cls(n, factor, rows_used, basis, row_factors, list(fallback.pairs), source="run")

    def factor(self, n: int) -> float:
        """Serial-estimated seconds done per wall second with ``n`` cases at once (1 at n = 1)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"parallel must be an integer >= 1, got {n!r}")
        if self.measured_n <= 1 or n == 1:
            return 1.0
        m = self.measured_n
        slowdown_m = m / self.factor_at_measured  # each case's wall over its serial time at concurrency m
        at = min(n, m)
        slowdown = 1.0 + (slowdown_m - 1.0) * (at - 1) / (m - 1)
        return at / slowdown


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


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
    """The ``attnbench train`` overrides of a slice (Hydra list syntax): its tasks, methods and seeds, and an
    autotuning slice's own ``parallel`` and ``case_timeout_s`` (neither is part of a case's id)."""
    overrides = [f"{key}=[{','.join(str(v) for v in piece[key])}]" for key in ("tasks", "methods", "seeds")]
    for key in ("parallel", "case_timeout_s"):
        if piece.get(key) is not None:
            value = piece[key]
            overrides.append(f"{key}={int(value) if float(value).is_integer() else value}")
    return overrides


def autotune_profile(first_call_s: float, parallel: int, timeout_s: float) -> tuple[int, float | None]:
    """(parallel, case_timeout_s or None) of a slice whose methods' largest first call is ``first_call_s``.

    A first call of ``AUTOTUNE_SLICE_S`` or more is Triton autotuning (fla's kernels: 60-94 s alone on the
    H200). Every worker process autotunes its own kernels until one has written the cache, so N cases starting at
    once autotune N times over on the same CPU and GPU: on the H200 at parallel=12, fla_linear_attn's first step
    took 260-320 s (its 6 cases timed out at 180 s after 1 step) and fla_simple_gla's decline came after 200-240 s
    instead of ~100. Such a slice runs at most ``AUTOTUNE_PARALLEL`` cases at once, each capped at the suite's
    ``case_timeout_s`` plus twice the first call (the forward's and the backward's autotuning, under contention)."""
    if first_call_s < AUTOTUNE_SLICE_S:
        return parallel, None
    return min(parallel, AUTOTUNE_PARALLEL), float(math.ceil(timeout_s + 2 * first_call_s))


def done_case_ids(run_dir: Path, retry: tuple[str, ...] = ()) -> set[str]:
    """Case ids with a row in ``run_dir`` (the resume set of ``attnbench train`` with the same ``retry``)."""
    from attnbench.record.quality import QualityStore

    return set(QualityStore(Path(run_dir), retry=tuple(retry)).done)


def stray_rows(run_dir: Path, grid_ids: set[str]) -> list[dict]:
    """Rows of ``run_dir`` whose case is not in the grid, counted by (method, status, reason): e.g. the
    ``unsupported`` rows of a method's default options that ``fit_method_options`` now fits (the fitted case has
    another id and is planned; the old row stays in the run folder, a record of the defaults not fitting)."""
    from attnbench.record.quality import read_jsonl

    counts: dict[tuple, int] = {}
    for row in read_jsonl(Path(run_dir) / "quality.jsonl"):
        if row.get("case_id") in grid_ids:
            continue
        reason = str(row.get("reason") or "")
        key = (str(row.get("method")), str(row.get("status")), reason.split(":", 1)[0] if reason else "")
        counts[key] = counts.get(key, 0) + 1
    return [{"method": m, "status": st, "reason": r, "rows": n}
            for (m, st, r), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def make_plan(cfg: dict, cost: CostModel, budget_s: float = BUDGET_S, done: set[str] | None = None,
              suite: str = "tasks_grid", run_id: str = "h200-task-grid", target_device: str = "cuda",
              parallel: int = 1, throughput: Throughput | None = None, max_calls: int | None = None) -> dict:
    """Pack the grid's cases still to do into calls of at most ``budget_s`` estimated wall seconds (a JSON-able
    dict). Case estimates are serial (one case alone on the GPU); with ``parallel`` = N a slice's cases run N at
    once, so its training takes serial seconds / ``throughput.factor(min(N, its runnable cases))`` of wall.
    Overheads (per call, per invocation) and first calls (compile, autotuning: once per key in a call) are
    charged in full. ``max_calls``: if the grid needs more calls, the seeds after the first of the fewest slowest
    methods (by serial estimate over all their tasks) that make the rest fit are packed into follow-up calls
    (``follow_up``: true, after the main ones): every case is still in exactly one call."""
    throughput = throughput or Throughput.serial()
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be an integer >= 1, got {parallel!r}")
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
                 "done": case.case_id in done, "call": None, "fitted": case.fitted_json or None}
        if planned == "run":
            key, seconds = cost.first_call(case)
            entry["first_call"] = ["/".join(str(k) for k in key), round(seconds, 2)]
        entries[case.case_id] = entry
        units.setdefault((case.task, case.method), []).append(entry)

    calls: list[dict] = []
    mode = {"follow_up": False}  # what new calls are: main or follow-up

    def profile_of(items: list[dict]) -> tuple[int, float | None]:
        """(parallel, case_timeout_s or None: the suite's) of a slice holding ``items``: a method whose first call
        autotunes (``AUTOTUNE_SLICE_S`` or more) runs at most ``AUTOTUNE_PARALLEL`` cases at once, with the
        suite's case cap plus twice its first call (see :func:`autotune_profile`)."""
        first = max((e["first_call"][1] for e in items if e["planned"] == "run"), default=0.0)
        return autotune_profile(first, parallel, timeout_s)

    def piece_wall(serial_s: float, first_s: float, runs: int, profile: tuple[int, float | None]) -> float:
        """A slice's estimated wall seconds: invocation, first calls, and its training at its concurrency."""
        factor = throughput.factor(max(1, min(profile[0], runs)))
        if throughput.source == "run" and profile[1] is None:  # compiles ran side by side, as measured
            return INVOCATION_OVERHEAD_S + (first_s + serial_s) / factor
        return INVOCATION_OVERHEAD_S + first_s + serial_s / factor

    def wall_of(piece: dict) -> float:
        return piece_wall(piece["serial_s"], piece["first_s"], piece["runs"], piece["profile"])

    def call_wall(call: dict) -> float:
        return CALL_OVERHEAD_S + sum(wall_of(p) for p in call["slices"])

    def costs(items: list[dict], call: dict) -> tuple[float, float, int]:
        """(serial training seconds, first-call seconds new to ``call``, runnable cases) of ``items``."""
        runs = [e for e in items if e["planned"] == "run"]
        first = {e["first_call"][0]: e["first_call"][1] for e in runs}
        return (sum(e["est_s"] for e in runs), sum(v for key, v in first.items() if key not in call["first_calls"]),
                len(runs))

    def wall_with(call: dict, piece: dict | None, items: list[dict]) -> float:
        """The call's estimated wall seconds with ``items`` added (to ``piece``, or as a new slice)."""
        serial, first, runs = costs(items, call)
        total = call_wall(call)
        if piece is None:
            return total + piece_wall(serial, first, runs, profile_of(items))
        return (total - wall_of(piece) + piece_wall(piece["serial_s"] + serial, piece["first_s"] + first,
                                                    piece["runs"] + runs, piece["profile"]))

    def new_call() -> dict:
        call = {"index": len(calls), "est_s": CALL_OVERHEAD_S, "slices": [], "first_calls": set(),
                "follow_up": mode["follow_up"]}
        calls.append(call)
        return call

    def place(call: dict, piece: dict | None, tasks: list[str], method: str, seeds: list[int],
              part: list[dict]) -> None:
        serial, first, runs = costs(part, call)
        if piece is None:
            piece = {"tasks": list(tasks), "methods": [], "seeds": seeds, "est_s": 0.0, "runs": 0, "unsupported": 0,
                     "serial_s": 0.0, "first_s": 0.0, "profile": profile_of(part)}
            call["slices"].append(piece)
        piece["methods"].append(method)
        piece["serial_s"] += serial
        piece["first_s"] += first
        for e in part:
            e["call"] = call["index"]
            piece["runs" if e["planned"] == "run" else "unsupported"] += 1
            if e["planned"] == "run":
                call["first_calls"].add(e["first_call"][0])
        piece["est_s"] = wall_of(piece)
        call["est_s"] = call_wall(call)

    def find(tasks: list[str], seeds: list[int], among: list[dict],
             profile: tuple[int, float | None] | None = None) -> tuple[dict, dict] | None:
        """A slice of the same tasks and seeds (and ``profile``, if given) in ``among``."""
        for call in among:
            for piece in call["slices"]:
                if piece["tasks"] == tasks and piece["seeds"] == seeds and profile in (None, piece["profile"]):
                    return call, piece
        return None

    def put(tasks: list[str], method: str, seeds: list[int], part: list[dict]) -> None:
        """First fit: the first call (in order) where ``part`` stays within the budget, else a new call."""
        for call in calls:
            found = find(tasks, seeds, [call], profile_of(part))
            if wall_with(call, found[1] if found else None, part) <= budget_s:
                place(call, found[1] if found else None, tasks, method, seeds, part)
                return
        place(new_call(), None, tasks, method, seeds, part)

    empty = {"est_s": CALL_OVERHEAD_S, "slices": [], "first_calls": set()}
    task_order = list(dict.fromkeys(task for task, _ in units))

    def pack(chosen: set[str], follow_up: bool) -> None:
        """Append calls holding the cases ``chosen`` (ids) to ``calls``."""
        mode["follow_up"] = follow_up
        by_method: dict[str, list[dict]] = {}  # method -> its pending cases over every task, planner order
        for (task, method), items in units.items():
            by_method.setdefault(method, []).extend(e for e in items if not e["done"] and e["case_id"] in chosen)
        by_method = {method: items for method, items in by_method.items() if items}

        def tasks_of(items: list[dict]) -> list[str]:
            return [task for task in task_order if any(e["task"] == task for e in items)]

        # a slice runs tasks x methods x seeds: a unit is a method with the tasks that have the same seeds to do.
        # A unit that fits one call stays whole (its tasks in one slice with other such units); one over a call
        # goes (task, method) at a time, and a (task, method) over a call alone seed by seed
        whole, split = [], []
        for method, items in by_method.items():
            seeds_of = {task: tuple(sorted({e["seed"] for e in items if e["task"] == task})) for task in tasks_of(items)}
            for seeds in dict.fromkeys(seeds_of.values()):
                tasks = [task for task, those in seeds_of.items() if those == seeds]
                unit = (tasks, method, [e for e in items if e["task"] in tasks])
                (whole if wall_with(empty, None, unit[2]) <= budget_s else split).append(unit)
        runs = [unit for unit in whole if any(e["planned"] == "run" for e in unit[2])]
        only_unsupported = [unit for unit in whole if not any(e["planned"] == "run" for e in unit[2])]
        units_run = list(runs)
        for tasks, method, items in split:
            for task in tasks:
                units_run.append(([task], method, [e for e in items if e["task"] == task]))
        # first fit decreasing: the largest units first
        units_run.sort(key=lambda unit: -wall_with(empty, None, unit[2]))
        for tasks, method, todo in units_run:
            seeds_all = sorted({e["seed"] for e in todo})
            alone = wall_with(empty, None, todo)
            groups = [[seed] for seed in seeds_all] if alone > budget_s else [seeds_all]  # over a call: seed by seed
            for seeds in groups:
                put(tasks, method, seeds, [e for e in todo if e["seed"] in seeds])
        for tasks, method, todo in only_unsupported:  # no GPU time: joined to a slice of the same tasks and seeds
            seeds = sorted({e["seed"] for e in todo})
            found = find(tasks, seeds, [call for call in calls if call["follow_up"] == follow_up],
                         (parallel, None))  # a slice at the plan's parallel (not an autotuning one)
            if found is None:
                put(tasks, method, seeds, todo)
            else:
                place(found[0], found[1], tasks, method, seeds, todo)

    todo_ids = {e["case_id"] for e in entries.values() if not e["done"]}
    method_task: dict[tuple[str, str], float] = {}
    for e in entries.values():
        if e["planned"] == "run":
            method_task[(e["task"], e["method"])] = method_task.get((e["task"], e["method"]), 0.0) + e["est_s"]
    method_s: dict[str, float] = {}
    for (task, method), seconds in method_task.items():
        method_s[method] = method_s.get(method, 0.0) + seconds
    slowest = sorted(method_s, key=lambda method: -method_s[method])

    def pack_all(deferred_methods: int) -> set[str]:
        """Pack with the seeds after the first of the ``deferred_methods`` slowest methods (every task of each,
        unsupported cases too, so that its slices stay whole tasks x seeds) in follow-up calls."""
        calls.clear()
        deferred = set()
        for method in slowest[:deferred_methods]:
            items = [e for (task, m), those in units.items() if m == method for e in those]
            first_seed = min(e["seed"] for e in items)
            deferred |= {e["case_id"] for e in items if e["seed"] != first_seed} & todo_ids
        pack(todo_ids - deferred, False)
        pack(deferred, True)
        return deferred

    def main_calls() -> int:
        return sum(not call["follow_up"] for call in calls)

    deferred_units = 0
    pack_all(0)
    if max_calls is not None and main_calls() > max_calls:  # the fewest slowest methods that make it fit
        lo, hi = 0, len(slowest)
        pack_all(hi)
        if main_calls() <= max_calls:
            while lo < hi:
                mid = (lo + hi) // 2
                pack_all(mid)
                if main_calls() <= max_calls:
                    hi = mid
                else:
                    lo = mid + 1
        deferred_units = hi
        pack_all(deferred_units)
    for call in calls:
        call.pop("first_calls")
        call["est_s"] = round(call["est_s"], 1)
        for piece in call["slices"]:
            for key in ("est_s", "serial_s", "first_s"):
                piece[key] = round(piece[key], 1)
            slice_parallel, slice_timeout = piece.pop("profile")
            if slice_parallel != parallel or slice_timeout is not None:  # an autotuning slice
                piece["parallel"], piece["case_timeout_s"] = slice_parallel, slice_timeout
            piece["overrides"] = slice_overrides(piece)
    todo = [e for e in entries.values() if not e["done"]]
    main = [c for c in calls if not c["follow_up"]]
    follow = [c for c in calls if c["follow_up"]]
    return {
        "suite": suite, "run_id": run_id, "target_device": target_device, "budget_s": budget_s,
        "case_timeout_s": timeout_s, "parallel": parallel, "max_calls": max_calls,
        "deferred_methods": slowest[:deferred_units],
        "throughput": {"factor": round(throughput.factor(parallel), 3), "measured_n": throughput.measured_n,
                       "factor_at_measured": round(throughput.factor_at_measured, 3), "rows": throughput.rows,
                       "basis": throughput.basis, "source": throughput.source,
                       "quantile": THROUGHPUT_QUANTILE if throughput.source == "committed" else None,
                       "margin": THROUGHPUT_MARGIN if throughput.source == "committed" else RUN_MARGIN,
                       "pairs": throughput.pairs,
                       "periods": throughput.row_factors if throughput.source == "run" else {},
                       "by_n": {str(n): round(throughput.factor(n), 3) for n in range(1, max(parallel, 8) + 1)}},
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
                   "calls": len(calls), "est_s": round(sum(c["est_s"] for c in calls), 1),
                   "main_calls": len(main), "main_est_s": round(sum(c["est_s"] for c in main), 1),
                   "follow_up_calls": len(follow), "follow_up_est_s": round(sum(c["est_s"] for c in follow), 1),
                   "follow_up_cases": sum(e["planned"] == "run" for e in todo if e["call"] is not None
                                          and calls[e["call"]]["follow_up"]),
                   "serial_s": round(sum(e["est_s"] for e in todo if e["planned"] == "run"), 1)},
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


CASE_FIELDS = ("case_id", "task", "method", "seq", "seed", "planned", "reason", "est_s", "done", "call", "first_call",
               "fitted")


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
    tp = plan["throughput"]
    if totals["follow_up_calls"]:
        deferred = plan["deferred_methods"]
        main_line = (f"- main run: **{totals['main_calls']} calls**, {totals['main_est_s'] / 60:.1f} minutes (at most "
                     f"{plan['max_calls']} asked); **follow-up: {totals['follow_up_calls']} calls**, "
                     f"{totals['follow_up_est_s'] / 60:.1f} minutes, {totals['follow_up_cases']} cases: the seeds "
                     f"after the first of the {len(deferred)} slowest methods (by serial estimate over their tasks), "
                     "listed below; planned, not dropped")
    else:
        main_line = (f"- everything in the main run ({totals['main_calls']} calls"
                     + (f", at most {plan['max_calls']} asked)" if plan.get("max_calls") else ")") + "; no follow-up")
    lines = [f"# Task grid plan: `attnbench train suite={plan['suite']}` on one H200, run `{plan['run_id']}`", "",
             "Written by `scripts/plan_task_grid.py` (no GPU): the grid comes from the train planner itself; "
             "every (task, method, length, seed) case is in exactly one call (checked by "
             "`attnbench.execute.task_grid.check_coverage`). Run call i with `scripts/device_task_grid.sh i`; "
             "re-plan the rest with `--done results/" + plan["run_id"] + "`.", "",
             f"- cases: {totals['cases']} ({totals['done']} already done), to run: {totals['to_run']}, "
             f"planned unsupported rows: {totals['unsupported']}",
             f"- parallel: **{plan['parallel']}** cases at once in each slice (`attnbench train "
             f"parallel={plan['parallel']}`); throughput factor **{tp['factor']:.2f}** (serial-estimated seconds "
             f"per wall second; see Throughput below)",
             f"- device calls: **{totals['calls']}** of at most {plan['budget_s']:.0f} s estimated wall each; "
             f"estimated total **{totals['est_s'] / 60:.1f} GPU minutes** ({totals['est_s'] / 3600:.2f} h; at 30 "
             f"minutes of device time a session, ~{math.ceil(totals['est_s'] / 1800)} sessions), for "
             f"{totals['serial_s'] / 60:.1f} minutes of serial-estimated training",
             main_line,
             f"- case_timeout_s: {plan['case_timeout_s']:.0f} (a run past it is a `timeout` row with its steps)",
             f"- autotuning methods (first call >= {AUTOTUNE_SLICE_S:.0f} s: fla's Triton autotuning): slices of their "
             f"own at parallel <= {AUTOTUNE_PARALLEL} with case_timeout_s = the suite's + 2 x the first call "
             "(overrides `parallel=` `case_timeout_s=` of the slice; scripts/device_task_grid.sh keeps them): "
             + (", ".join(sorted({m for c in plan["calls"] for p in c["slices"] if p.get("case_timeout_s")
                                  for m in p["methods"]})) or "none"), "",
             "## Throughput with parallel=N (how the factor was derived)", "",
             f"A slice's training takes its serial estimate / factor(min(N, its runnable cases)) of wall; overheads "
             + ("and autotuning first calls are charged in full, compiles divided by the factor like the training "
                "(as measured). " if tp.get("source") == "run" else "and first calls are charged in full. ")
             + "Factor derived "
             + ("**from the run's own rows** (`--done`): " if tp.get("source") == "run" else
                "from committed runs' rows (no `--done` run with timed rows): ")
             + f"{tp['basis']}. Between 1 and {tp['measured_n']} cases at once "
             "each case's slowdown (N / factor) is interpolated linearly from 1; past "
             f"{tp['measured_n']} no further gain is assumed."
             + (" Most committed rows clip at N: the cost model's serial estimate of these tiny launch-bound "
                "models is above what they took even at concurrency N (so the factor is taken low in the "
                "distribution, then cut by the margin). Rows of a task without a serial step fit (the MQAR state "
                "sweep of h200-analysis-state-long, niah, ICL) are not used." if tp.get("source") != "run" else "")
             + " Cross-check, a fused exact kernel at concurrency N beside a serial sdpa_cudnn row of the same "
             "shape (N x serial step / step): " + ("; ".join(tp.get("pairs") or []) or "none committed") + ".", "",
             *([f"| busy period of the run (used) | factor (serial / (span - first calls)) |", "|---|---|"]
               + [f"| {k} | {v:.2f} |" for k, v in tp["periods"].items()] + [""] if tp.get("periods") else []),
             "| N | " + " | ".join(tp["by_n"]) + " |", "|---|" + "---|" * len(tp["by_n"]),
             "| factor | " + " | ".join(f"{v:.2f}" for v in tp["by_n"].values()) + " |", "",
             "## Cost model (assumptions)", "",
             "case s = case overhead + (steps + eval batches) x step s (capped at case_timeout_s + one step); "
             "step s = the task's baseline (sdpa_cudnn) step, fitted on committed task runs as intercept + "
             "slope x batch x length, + layers x the method's extra ms per fwd_bwd attention call over "
             "sdpa_cudnn at the shortest length of a committed kernel run, scaled by (task call work / "
             "measured call work, never below 2048 x 16 x 128) (work = tokens x width); plus, once per (method, task, "
             "length) in a call, the method's first-call time (its largest compile_s in the kernel runs). These "
             "are serial estimates (one case alone on the GPU): the Throughput factor turns them into wall time.",
             "",
             f"- per call {a['call_overhead_s']:.0f} s (install, finalize, report), per invocation "
             f"{a['invocation_overhead_s']:.0f} s, per case {a['case_overhead_s']:.2f} s (median wall_s - "
             f"train_wall_s of the committed rows, at least 0.5 s), fla first call (Triton autotuning) "
             f"{a['autotune_first_call_s']:.0f} s once per (method, heads, head width, dtype) in a call",
             f"- a method without kernel rows: extra {a['default_extra_ms']['exact']:.3f} ms (exact) / "
             f"{a['default_extra_ms']['approximate']:.3f} ms (approximate) per call at 2048 x 16 x 128 tokens x width, "
             f"first call {a['default_compile_s']:.2f} s (medians of the measured methods)",
             f"- sources: {', '.join(a['sources'])}", "",
             "| task | baseline step intercept (ms) | slope (µs / token) | basis |", "|---|---|---|---|"]
    for task, fit in a["step_fits"].items():
        lines.append(f"| {task} | {fit['intercept_ms']:.2f} | {fit['slope_us_per_token']:.4f} | {fit['basis']} |")
    factor = tp["factor"]
    over = {k: v for k, v in plan["method_task_est_s"].items() if v / factor > 120}
    lines += ["", f"## Method-tasks over 2 minutes of wall at parallel={plan['parallel']} (serial estimate / "
              f"{factor:.2f}; {len(over)} of {len(plan['method_task_est_s'])})", ""]
    lines += [", ".join(f"`{k}` {v / factor / 60:.1f} min ({v / 60:.1f} serial)"
                        for k, v in sorted(over.items(), key=lambda kv: -kv[1])) or "none"]
    slowest = sorted(plan["method_task_est_s"].items(), key=lambda kv: -kv[1])[:10]
    lines += ["", "Slowest ten (serial estimate): " + ", ".join(f"`{k}` {v / 60:.1f} min" for k, v in slowest)]
    fitted: dict[tuple[str, str], list[dict]] = {}
    for e in plan["cases"]:
        if e.get("fitted"):
            fitted.setdefault((e["method"], e["fitted"]), []).append(e)
    if fitted:
        lines += ["", f"## Method options fitted to the length (`fit_method_options`: {sum(map(len, fitted.values()))} "
                  "cases)", "", "Options the suite does not set, whose method defaults do not fit these lengths, "
                  "fitted by the planner (`attnbench.methods.fitting`; the rules are in conf/suite/tasks_grid.yaml). "
                  "The fitted values are part of each case's id and in its row (column `fitted_options`).", "",
                  "| method | fitted options | task/length | cases | to run |", "|---|---|---|---|---|"]
        for (method, options), items in sorted(fitted.items()):
            where = ", ".join(dict.fromkeys(f"{e['task']}/{e['seq']}" for e in items))
            lines.append(f"| {method} | `{options}` | {where} | {len(items)} | "
                         f"{sum(not e['done'] and e['planned'] == 'run' for e in items)} |")
    stray = plan.get("stray_rows") or []
    if stray:
        lines += ["", f"## Rows of the run outside this grid ({sum(s['rows'] for s in stray)}: not counted, not "
                  "re-run)", "", "Rows of `--done` whose case id is no case of this grid. Those of a method with "
                  "fitted options are its old cases with the default options (`unsupported`: the default did not "
                  "fit); the fitted cases have new ids and are planned above as separate cases; the old rows stay "
                  "in the run folder as the record of the defaults.", "",
                  "| method | status | reason (head) | rows |", "|---|---|---|---|"]
        lines += [f"| {s['method']} | {s['status']} | {s['reason']} | {s['rows']} |" for s in stray]
    reasons: dict[str, int] = {}
    for e in plan["cases"]:
        if e["planned"] == "unsupported" and not e["done"]:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    lines += ["", "## Planned unsupported rows (written by the slice that holds them)", "",
              "| cases | reason |", "|---|---|"]
    lines += [f"| {n} | {r} |" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    if totals["follow_up_calls"]:
        lines += ["", f"## Follow-up ({totals['follow_up_calls']} calls, {totals['follow_up_est_s'] / 60:.1f} minutes)",
                  "", "Calls " + ", ".join(str(c["index"]) for c in plan["calls"] if c["follow_up"]) + " hold the seeds "
                  "after the first of these methods, every task (slowest first, by serial estimate over their "
                  "tasks); run them after the main calls (or re-plan with `--done`):", "",
                  ", ".join(f"`{k}`" for k in plan["deferred_methods"])]
    lines += ["", "## Calls", "", "| call | est. s | slice (`attnbench train suite=" + plan["suite"] + " ...`) | "
              "runs | unsupported | est. s |", "|---|---|---|---|---|---|"]
    for call in plan["calls"]:
        for j, piece in enumerate(call["slices"]):
            tag = " (follow-up)" if call["follow_up"] else ""
            head = f"| {call['index']}{tag} | {call['est_s']:.0f} " if j == 0 else "| | "
            lines.append(f"{head}| `{' '.join(piece['overrides'])}` | {piece['runs']} | {piece['unsupported']} | "
                         f"{piece['est_s']:.0f} |")
    return "\n".join(lines) + "\n"
