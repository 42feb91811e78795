"""`attnbench train`: plan (task x length x method x seed), train and evaluate each, write quality rows.

Config: ``conf/train.yaml`` (keys below), the task group ``conf/task/`` (every built-in task's parameters, under
``task_options.<task>``) and a preset from ``conf/suite/`` (``suite=tasks_cpu``, ``tasks_gpu``, ``mqar``).
Every field is checked before any work (``ConfigError`` names it). A case whose method cannot run the task's
attention shape (by its declared capabilities, or its builder's ``Unsupported``), whose task needs a missing
package, or whose method is unavailable, is an ``unsupported`` row with the reason; a NaN loss is ``diverged``,
an OOM ``oom``, an exception ``error``, a case past ``case_timeout_s`` ``timeout``. A case that killed the
process (the run resumes with the same run_id) is recorded as ``crashed`` from the marker it left.

``parallel: N`` (default 1: every case in this process, one after another) runs N cases at once in N spawned
worker processes on the same device; this process alone writes the rows, as results arrive. Each case in flight
has its marker (``quality.inflight.<case_id>.json``). A worker that dies (segfault, ``os._exit``, killed) breaks
the pool: the cases in flight in it become ``crashed`` rows and a fresh pool runs the rest. Ctrl-C or SIGTERM
kills the workers (they also die with this process however it ends) and leaves the cases in flight without a
row or a marker, to run on resume. Rows carry ``concurrent`` (the ``parallel`` value): their ``train_wall_s`` and
``tokens_per_s`` were measured while up to that many cases shared the device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from attnbench.config.plan import DTYPES, ConfigError, plan_options, resolve_devices, unsupported_reason

GLOBAL_OVERRIDES = ("seq_lens", "steps", "batch", "lr", "d_model", "layers", "heads")
# model options set for every train task when given globally (attnbench.tasks.model; per task: task_options)
GLOBAL_MODEL_OPTIONS = ("hybrid_schedule", "qk_source")


@dataclass(frozen=True)
class TrainCase:
    task: str
    method: str
    seq: int
    seed: int
    dtype: str
    params_json: str  # the task's full parameters, canonical JSON
    tf32: bool = False  # the float32 matmuls on TF32 tensor cores (CUDA; the train config key tf32)
    fitted_json: str = ""  # method options fitted to the case's length (fit_method_options), canonical JSON

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    @property
    def fitted(self) -> dict:
        return json.loads(self.fitted_json) if self.fitted_json else {}

    @property
    def case_id(self) -> str:
        fields = [self.task, self.method, self.seq, self.seed, self.dtype, self.params_json]
        key = fields + (["tf32"] if self.tf32 else [])  # ids of full-float32 cases as before the key
        if self.fitted_json:  # ids of cases without fitted options as before the key
            key += ["fitted", self.fitted_json]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]


@dataclass
class TrainPlan:
    runnable: list[TrainCase]
    unsupported: list[tuple[TrainCase, str]]
    device: str


def _list(cfg: dict, field: str) -> list:
    value = cfg.get(field)
    if value is None:
        raise ConfigError(field, "is required")
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigError(field, "is an empty list; give at least one value")
    return values


def resolve_tasks(cfg: dict) -> list[str]:
    from attnbench.tasks import TASKS

    names = _list(cfg, "tasks")
    if names == ["all"]:
        return sorted(TASKS)
    if names == ["all_train"]:  # every task that trains a model (no probes, no experiments)
        return sorted(name for name, spec in TASKS.items() if spec.cls.kind == "train")
    for name in names:
        if name not in TASKS:
            raise ConfigError("tasks", f"unknown task {name!r}; registered: {', '.join(sorted(TASKS))}")
    return list(dict.fromkeys(names))


def task_parameters(cfg: dict, name: str) -> dict:
    """The task's defaults, then ``task_options.<name>``, then the global overrides (``steps``, ...)."""
    from attnbench.tasks import TaskParamError, task_params

    options = (cfg.get("task_options") or {}).get(name) or {}
    if not isinstance(options, dict):
        raise ConfigError(f"task_options.{name}", f"must be a mapping, got {options!r}")
    try:
        params = task_params(name, options)
    except TaskParamError as exc:
        raise ConfigError(f"task_options.{name}", str(exc)) from None
    for key in GLOBAL_OVERRIDES:
        if cfg.get(key) is not None and key in params:
            params[key] = cfg[key]
    from attnbench.tasks import TASKS

    for key in GLOBAL_MODEL_OPTIONS:
        if cfg.get(key) is not None and TASKS[name].cls.kind == "train":
            params[key] = cfg[key]
    if not isinstance(params["seq_lens"], (list, tuple)):
        params["seq_lens"] = [params["seq_lens"]]
    return params


def build_train_plan(cfg: dict, target_device: str | None = None, check_availability: bool = True) -> TrainPlan:
    """Validate ``cfg`` and expand it into cases; ``ConfigError`` before any work.

    ``target_device`` (``cuda``, ``cpu``, ``cuda:N``) plans for another machine than this one (no GPU needed:
    ``scripts/plan_task_grid.py`` plans the H200 grid on a CPU); ``check_availability=False`` leaves whether a
    method's or task's packages import to the machine that runs the case (its row says), judging only the
    declared capabilities here.
    """
    from attnbench.config.plugins import load_plugins

    load_plugins(cfg.get("plugins") or [])  # a plan built alone sees the methods a run of ``cfg`` sees
    from attnbench.methods import METHODS
    from attnbench.tasks import TASKS, TaskParamError
    from attnbench.tasks.train import attention_case

    from attnbench.config.plan import check_method_options, resolve_methods

    if isinstance(cfg.get("methods"), str):  # `methods: all` (a scalar) as well as `methods: [all]`
        cfg = {**cfg, "methods": [cfg["methods"]]}
    tasks = resolve_tasks(cfg)
    methods = resolve_methods(cfg)
    check_method_options(cfg)  # a misspelt key fails here, before any case
    seeds = _list(cfg, "seeds")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError("seeds", f"must be non-negative integers, got {seed!r}")
    dtype = cfg.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"{dtype!r} is not one of: {', '.join(DTYPES)}")
    tf32 = cfg.get("tf32")
    if tf32 is None:
        tf32 = False
    if not isinstance(tf32, bool):
        raise ConfigError("tf32", f"must be true or false (float32 matmuls on TF32 tensor cores), got {tf32!r}")
    fit = cfg.get("fit_method_options")
    if fit is None:
        fit = False
    if not isinstance(fit, bool):
        raise ConfigError("fit_method_options", f"must be true or false (fit method options the config does not "
                                                f"set to each case's length), got {fit!r}")
    timeout = cfg.get("case_timeout_s", 600)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError("case_timeout_s", f"must be a positive number, got {timeout!r}")
    parallel_cases(cfg)
    unknown = set(cfg.get("task_options") or {}) - set(TASKS)
    if unknown:
        raise ConfigError("task_options", f"unknown task(s) {sorted(unknown)}; registered: {', '.join(sorted(TASKS))}")
    if target_device is None:
        device = resolve_devices(cfg)[0]
    elif target_device in ("cpu", "cuda") or (target_device.startswith("cuda:") and target_device[5:].isdigit()):
        device = target_device
    else:
        raise ConfigError("device", f"target device {target_device!r} is not one of: cpu, cuda, cuda:N")
    options = plan_options(cfg)
    given = cfg.get("method_options") or {}
    runnable, unsupported = [], []
    for name in tasks:
        spec = TASKS[name]
        params = task_parameters(cfg, name)
        available, why = spec.availability() if check_availability else (True, "")
        for seq in params["seq_lens"]:
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
                raise ConfigError(f"task_options.{name}.seq_lens", f"must be positive integers, got {seq!r}")
            task = None
            if available:
                try:
                    task = spec.make(params, seq)
                except TaskParamError as exc:
                    raise ConfigError(f"task_options.{name}", f"{exc} (length {seq})") from None
            for method in methods:
                # fitted only where the case runs otherwise (capabilities do not depend on method options): an
                # unsupported case keeps its id
                fitted = fit_options(task, method, given.get(method)) if fit and task is not None else {}
                fitted_json = json.dumps(fitted, sort_keys=True) if fitted else ""
                for seed in seeds:
                    case = TrainCase(name, method, seq, seed, dtype, json.dumps(params, sort_keys=True), tf32)
                    if not available:
                        unsupported.append((case, f"task unavailable: {why}"))
                        continue
                    attn_case = attention_case(task, method, int(params["batch"]), dtype, seed, device)
                    if task.kind == "probe":  # forward calls only
                        attn_case = dataclasses.replace(attn_case, mode="fwd")
                    reason = _unsupported(task, METHODS[method], attn_case, options, check_availability)
                    if reason:
                        unsupported.append((case, reason))
                    else:
                        runnable.append(dataclasses.replace(case, fitted_json=fitted_json))
    return TrainPlan(runnable, unsupported, device)


def fit_options(task, method: str, given: dict | None) -> dict:
    """``fit_method_options``: the options of ``method`` fitted to ``task``'s attention lengths, for the fields
    ``given`` (the config's ``method_options.<method>``) does not set and only where the method's defaults do not
    fit (``attnbench.methods.fitting``). Train tasks only: probes and experiments call the method at lengths of
    their own."""
    from attnbench import masks
    from attnbench.methods.fitting import fitted_options

    if task.kind != "train":
        return {}
    causal = masks.make_mask(task.mask_name).causal
    return fitted_options(method, task.seq_q, task.seq_kv, causal, given)


def parallel_cases(cfg: dict) -> int:
    """The config key ``parallel``: cases run at once (an int >= 1; default 1, every case in this process)."""
    parallel = cfg.get("parallel", 1)
    if parallel is None:
        return 1
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError("parallel", f"must be an integer >= 1 (cases run at once), got {parallel!r}")
    return parallel


def _unsupported(task, method, attn_case, options: dict, check_availability: bool = True) -> str | None:
    from attnbench import masks

    caps = method.caps
    if task.kind in ("probe", "experiment") and caps.form == "layer":
        article = "an" if task.kind[0] in "aeiou" else "a"
        return f"{article} {task.kind} calls the method on q, k, v; a layer-form method takes x"
    if caps.form == "layer" and task.arch == "cross":
        return "a layer-form method has no cross-attention form (queries and keys from one sequence)"
    spec = masks.make_mask(attn_case.mask)
    available = method.availability() if check_availability else (True, "")
    return unsupported_reason(attn_case, spec, caps, available, options)


def _reason(exc: BaseException) -> str:
    from attnbench.execute.worker import _reason as worker_reason

    return worker_reason(exc, "training")


def _describe(case: TrainCase, run_id: str, device_name: str) -> dict:
    from attnbench.methods import METHODS
    from attnbench.record.quality import empty_row
    from attnbench.tasks import TASKS

    spec = TASKS[case.task]
    params = case.params
    method = METHODS.get(case.method)
    row = empty_row()
    row.update(run_id=run_id, case_id=case.case_id, kind=spec.cls.kind, method=case.method, task=case.task,
               pattern=spec.cls.pattern, seq=case.seq, d_model=params.get("d_model"), layers=params.get("layers"),
               heads=params.get("heads"), steps=params.get("steps"), batch=params.get("batch"), lr=params.get("lr"),
               seed=case.seed, dtype=case.dtype, metric=spec.cls.metric, higher_is_better=spec.cls.higher_is_better,
               device=device_name, model_options=_model_options(params), tf32=case.tf32,
               fitted_options=case.fitted_json or None)
    if method is not None:
        row.update(family=method.caps.family, exact=method.caps.exact)
    return row


def _model_options(params: dict) -> str | None:
    from attnbench.tasks import MODEL_OPTIONS

    chosen = {k: params[k] for k in MODEL_OPTIONS if params.get(k) is not None}
    return json.dumps(chosen, sort_keys=True) if chosen else None


def run_case(case: TrainCase, device: str, options: dict, method_params: dict, timeout_s: float) -> dict:
    """Train/probe one case in this process -> the row's measured columns (status, reason, value, ...)."""
    import torch

    from attnbench.execute.case import _compiler_config_restored
    from attnbench.execute.worker import _classify
    from attnbench.methods import METHODS, Unsupported
    from attnbench.tasks import TASKS
    from attnbench.tasks.train import float32_precision, train_task

    spec = TASKS[case.task]
    task = spec.make(case.params, case.seq)
    options = {**options, "tf32": case.tf32}  # read by tasks.train.train_task (also inside experiments)
    measured = {"seq_q": task.seq_q, "seq_kv": task.seq_kv}
    try:
        # experiments and probes fit their own models: the case's matmul precision holds for them too
        with _compiler_config_restored(), float32_precision(case.tf32, torch.device(device).type):
            if spec.cls.kind in ("probe", "experiment"):  # the task runs the method itself
                budget = {"max_wall_s": timeout_s} if spec.cls.kind == "experiment" else {}
                outcome = task.probe(case.method, seed=case.seed, dtype=case.dtype, device=device, options=options,
                                     method_params=method_params, **budget)
            else:
                outcome = train_task(case.task, case.params, case.seq, case.method, seed=case.seed, dtype=case.dtype,
                                     device=device, options=options, method_params=method_params,
                                     max_wall_s=timeout_s)
    except Unsupported as exc:
        return {**measured, "status": "unsupported", "reason": str(exc)}
    except Exception as exc:  # OOM and everything else: a row, and the run goes on
        method = METHODS.get(case.method)
        declined = method.caps.declined(exc) if method is not None else None
        if declined is not None:  # the backend's own refusal (fla's gated kernels on Hopper): as in a timed case
            return {**measured, "status": "unsupported", "reason": declined}
        status = _classify(exc)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {**measured, "status": status, "reason": _reason(exc)}
    measured.update(status=outcome.status, reason=outcome.reason, value=outcome.value, breakdown=outcome.breakdown,
                    extras=outcome.extras, final_loss=outcome.final_loss, steps_done=outcome.steps_done,
                    train_wall_s=outcome.train_wall_s, tokens_per_s=outcome.tokens_per_s,
                    peak_mem_mb=outcome.peak_mem_mb, parameters=outcome.parameters)
    return measured


MARKER_PREFIX = "quality.inflight"
"""``quality.inflight.<case_id>.json``: a case in flight (``quality.inflight.json``: the one-marker form before
``parallel``, still read on resume)."""


def _marker(run_dir: Path, case_id: str) -> Path:
    return run_dir / f"{MARKER_PREFIX}.{case_id}.json"


def _record_leftover_markers(run_dir: Path, store, stamp: dict) -> None:
    """Markers a previous invocation left (it died with those cases in flight): a ``crashed`` row each for a
    case without a row since, then the markers go."""
    for marker in sorted(run_dir.glob(f"{MARKER_PREFIX}*.json")):
        try:
            died = json.loads(marker.read_text())
        except ValueError:
            died = None
        if isinstance(died, dict) and died.get("case_id") and died["case_id"] not in store.done:
            described = died.get("row") if isinstance(died.get("row"), dict) else {"case_id": died["case_id"]}
            concurrent = described.get("concurrent") or 1
            if concurrent <= 1:
                why = "the process died during this case (a previous invocation left its marker)"
            else:  # a worker's own death is recorded by the parent at once: here the parent itself was killed
                why = (f"a previous invocation (parallel={concurrent}) was killed while this case ran in one of its "
                       "workers (it left the case's marker; the case may be innocent)")
            row = {**described, "status": "crashed",
                   "reason": f"{why}; not retried, run with retry=[crashed] to try again", **stamp}
            store.append(row)
        marker.unlink(missing_ok=True)


def run_train(cfg: dict, command: str, show_progress: bool = True) -> Path:
    """Validate, plan and run ``cfg``; returns the run folder."""
    from tqdm import tqdm

    from attnbench.config.plugins import load_plugins
    from attnbench.execute.runner import default_run_id, worker_options
    from attnbench.record import envinfo
    from attnbench.record.quality import QualityStore

    load_plugins(cfg.get("plugins") or [])
    import attnbench.tasks  # noqa: F401  (the built-in tasks)

    plan = build_train_plan(cfg)
    parallel = parallel_cases(cfg)
    run_id = str(cfg.get("run_id") or default_run_id())
    run_dir = Path(cfg.get("results_dir") or "results") / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    store = QualityStore(run_dir, retry=tuple(cfg.get("retry") or ()))
    invocation, facts = envinfo.begin_invocation(run_dir, run_id, command)
    import yaml

    (run_dir / f"train_config.{invocation}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    stamp = {"host": facts["host"], "git_sha": facts["git_sha"], "git_dirty": facts["git_dirty"]}
    device = plan.device
    device_name = _device_name(device)
    _record_leftover_markers(run_dir, store, stamp)
    rows_before = len(store.rows)
    for case, reason in plan.unsupported:
        if case.case_id not in store.done:
            store.append({**_describe(case, run_id, device_name), "status": "unsupported", "reason": reason,
                          "wall_s": 0.0, "started_at": envinfo.now(), "concurrent": parallel, **stamp})
    options = worker_options(cfg)
    timeout_s = float(cfg.get("case_timeout_s", 600))
    todo = [c for c in plan.runnable if c.case_id not in store.done]
    progress = tqdm(total=len(plan.runnable) + len(plan.unsupported),
                    initial=len(plan.runnable) + len(plan.unsupported) - len(todo), desc=run_id, unit="run",
                    disable=not show_progress, dynamic_ncols=True)

    marked: set[str] = set()  # the cases with a marker written (or being written) and no row yet

    def begin(case: TrainCase) -> dict:
        """The case's row so far, and its marker written (it is in flight from now on)."""
        progress.set_postfix_str(f"{case.task} {case.method} {case.seq} s{case.seed}", refresh=False)
        row = {**_describe(case, run_id, device_name), "started_at": envinfo.now(), "concurrent": parallel, **stamp}
        marked.add(case.case_id)  # before the file exists: an interrupt from here on still removes it
        _marker(run_dir, case.case_id).write_text(json.dumps({"case_id": case.case_id, "row": row}, default=str))
        return row

    def finish(case: TrainCase, row: dict) -> None:
        store.append(row)
        marked.discard(case.case_id)
        _marker(run_dir, case.case_id).unlink(missing_ok=True)
        progress.update(1)

    def abandon(case_ids=None) -> None:
        """Stopped from outside (Ctrl-C, SIGTERM) or a failure of this process (not of a case): the cases in
        flight (or ``case_ids`` of them: a case a broken pool refused) get no row and lose their markers, so that
        they run again on resume (not ``crashed``)."""
        for case_id in list(marked if case_ids is None else case_ids):
            _marker(run_dir, case_id).unlink(missing_ok=True)
            marked.discard(case_id)

    with _stop_on_signals():
        try:
            if parallel == 1:
                for case in todo:
                    row = begin(case)
                    row.update(_worker_case(case, device, options, timeout_s))  # what a pool worker runs, here
                    finish(case, row)
            else:
                from attnbench.config.plugins import resolve_plugin_paths

                _run_parallel(todo, parallel, begin, finish, abandon, (device, options, timeout_s),
                              resolve_plugin_paths(cfg.get("plugins") or []))
        finally:  # on every way out: a marker without its row here would read as a crash on resume
            with _signals_ignored():
                abandon()
    progress.close()
    envinfo.end_invocation(run_dir, invocation, len(store.rows) - rows_before)
    store.finalize()
    return run_dir


def _worker_threads(parallel: int) -> int:
    """Torch threads per worker: this process's share, so that N workers do not oversubscribe the CPU."""
    import torch

    return max(1, torch.get_num_threads() // parallel)


def _worker_init(plugins: list, parent_pid: int, threads: int) -> None:
    """A pool worker's start: die with the parent, leave Ctrl-C to it, the thread share, the plugins."""
    import signal
    import threading

    from attnbench.execute.worker import die_with_parent

    die_with_parent(parent_pid)

    def watch():  # where the kernel's parent-death signal is not available
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="attnbench-parent-watchdog", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool (and kills this process)
    import torch

    torch.set_num_threads(threads)
    from attnbench.config.plugins import load_plugins

    load_plugins(plugins)
    import attnbench.tasks  # noqa: F401


def _worker_case(case: TrainCase, device: str, options: dict, timeout_s: float) -> dict:
    """One case (in a pool worker, or in this process when ``parallel`` is 1) -> its measured columns, ``wall_s``
    and ``started_at`` included."""
    from attnbench.record import envinfo

    started_at, started = envinfo.now(), time.perf_counter()
    method_params = {**((options.get("method_options") or {}).get(case.method) or {}), **case.fitted}
    measured = run_case(case, device, options, method_params, timeout_s)
    return {**measured, "started_at": started_at, "wall_s": time.perf_counter() - started}


def _run_parallel(todo: list[TrainCase], parallel: int, begin, finish, abandon, run_args: tuple,
                  plugins: list) -> None:
    """Run ``todo`` in pools of ``parallel`` spawned workers, at most ``parallel`` cases in flight (each with its
    marker); ``finish`` records each row here, as it arrives. A pool broken by a worker's death: its cases in
    flight are ``crashed`` rows and a fresh pool runs the rest. Ctrl-C / SIGTERM (or any failure here): ``abandon``
    first (the cases in flight lose their markers: they run on resume), then the workers are killed, with further
    signals ignored, and the exception goes on."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    queue = list(reversed(todo))
    context = multiprocessing.get_context("spawn")
    init_args = (plugins, os.getpid(), _worker_threads(parallel))
    while queue:
        pool = None
        in_flight: dict = {}  # future -> (case, row)
        processes: dict = {}  # pid -> the pool's worker processes (for exit codes and killing)
        broken: list = []
        try:
            pool = ProcessPoolExecutor(max_workers=min(parallel, len(queue)), mp_context=context,
                                       initializer=_worker_init, initargs=init_args)
            refused = False  # the pool broke between a wait and a submit: submit no more, collect what it ran
            while (queue or in_flight) and not broken:
                while queue and len(in_flight) < parallel and not refused:
                    case = queue.pop()
                    row = begin(case)
                    try:
                        in_flight[pool.submit(_worker_case, case, *run_args)] = (case, row)
                    except BrokenProcessPool:  # this case never ran: back to the queue, for the next pool
                        abandon([case.case_id])
                        queue.append(case)
                        refused = True
                    processes.update(getattr(pool, "_processes", None) or {})
                if refused and not in_flight:  # the case that broke it finished (or failed) already
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    case, row = in_flight.pop(future)
                    try:
                        row.update(future.result())
                    except BrokenProcessPool:
                        broken.append((case, row))
                        continue
                    except Exception as exc:  # the worker could not run or return the case: a row all the same
                        row.update(status="error", reason=_reason(exc))
                    finish(case, row)
            if broken:  # the pool fails every case still in flight in it (a case that finished first keeps its row)
                wait(in_flight, timeout=30)
                for future, (case, row) in list(in_flight.items()):
                    exc = future.exception() if future.done() and not future.cancelled() else BrokenProcessPool()
                    if isinstance(exc, BrokenProcessPool):
                        broken.append((case, row))
                    else:
                        row.update(future.result() if exc is None else
                                   {"status": "error", "reason": _reason(exc)})
                        finish(case, row)
                    del in_flight[future]
                codes = _exit_codes(pool, processes.values())
                died = ", ".join(map(str, sorted({code for code in codes if code not in (0, None)}))) or "unknown"
                for case, row in broken:
                    others = ("no other case was in flight" if len(broken) == 1 else
                              f"{len(broken) - 1} other case(s) were in flight, and any of them may have killed it")
                    row.update(status="crashed", reason=(
                        f"a worker process of the pool of {parallel} died while this case ran ({others}; the "
                        f"workers' exit codes: {died}, a negative code is a signal, -15 the pool ending the "
                        "others); not retried, run with retry=[crashed] to try again"))
                    finish(case, row)
        except BaseException:  # Ctrl-C, SIGTERM (SystemExit) or a failure here: no orphan, no row, no marker
            with _signals_ignored():  # a second signal (`timeout` sends SIGTERM to the pid, then to its group)
                abandon()  # first: whatever happens next, no marker is left to read as a crash
                if pool is not None:
                    processes.update(getattr(pool, "_processes", None) or {})  # spawned during an interrupted submit
                _kill(list(processes.values()))
                if pool is not None:
                    try:
                        pool.shutdown(wait=False, cancel_futures=True)
                    except Exception:  # a pool broken under us: its workers are dead already
                        pass
            raise
        pool.shutdown(wait=True)


def _exit_codes(pool, processes, grace_s: float = 30.0) -> list:
    """The exit codes of a broken pool's workers. The pool's manager thread reaps them (it SIGTERMs the survivors and
    joins them all): read the codes after it is done, never beside it, or a ``waitpid`` race can read a dead worker's
    code as ``None`` (a ``-15`` alone in the reason where a ``139`` was)."""
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:
        manager.join(timeout=grace_s)
    codes = []
    for process in processes:
        process.join(timeout=5)
        codes.append(process.exitcode)
    return codes


def _kill(processes, grace_s: float = 10.0) -> None:
    """SIGKILL every process, then wait for them (``grace_s`` in all: a CUDA process can take seconds to go)."""
    for process in processes:
        try:
            process.kill()
        except (OSError, ValueError, AttributeError):
            pass
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        except (OSError, ValueError, AttributeError, AssertionError):
            pass


_STOPPING: list[int] = []  # the signal that is stopping this process's run_train, if any


def _stop(signum, frame):
    """SIGTERM (e.g. `timeout`) ends like Ctrl-C; only the first signal raises: `timeout` sends SIGTERM to the
    process and then to its whole group, and a second exception would cut the clean-up short."""
    import signal

    if _STOPPING:
        return
    _STOPPING.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _stop_on_signals():
    """While the cases run: SIGINT and SIGTERM raise once (``_stop``), later ones are ignored (main thread only:
    elsewhere, nothing changes)."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def handlers():
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        _STOPPING.clear()
        saved = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, previous in saved.items():
                signal.signal(sig, previous)
            _STOPPING.clear()

    return handlers()


def _signals_ignored():
    """SIGINT and SIGTERM ignored while the block runs (a clean-up that must not be cut short; main thread only)."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def ignored():
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, previous in saved.items():
                signal.signal(sig, previous)

    return ignored()


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def summary_lines(run_dir: Path) -> list[str]:
    """One line per row: task, length, method, seed, status and value (what the CLI prints at the end)."""
    from attnbench.record.quality import load_quality

    import pandas as pd

    frame = load_quality(run_dir)
    lines = []
    for row in frame.sort_values(["task", "seq", "method", "seed"]).itertuples():
        value = "" if pd.isna(row.value) else f"{row.metric}={row.value:.4f}"
        reason = "" if row.status == "ok" else f" ({str(row.reason)[:100]})"
        lines.append(f"{row.task:16s} {row.seq!s:>6} {row.method:16s} s{row.seed} {row.status:11s} {value}{reason}")
    return lines
