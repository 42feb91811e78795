"""The parent side of a sweep: plan, start one worker per device, feed cases, collect rows, never lose one.

A case whose worker raises, runs out of memory, hangs past ``case_timeout_s`` or dies (segfault, illegal
memory access, ``os._exit``) still yields its row; the sweep goes on with a fresh worker. Rows are appended
to ``rows.jsonl`` as cases finish; running the same ``run_id`` again resumes and skips finished cases.

Ctrl-C or SIGTERM ends a sweep cleanly: the workers are killed, the cases in flight get no row (they run on
resume), the rows so far are kept and the tidy tables written, and ``SweepInterrupted`` is raised. Workers
die with the parent however it ends (``worker.py``: parent-death signal and a watchdog).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from attnbench.record import envinfo as envinfo
from attnbench.config.plan import Case, ConfigError, Plan, build_plan, plan_options, validate_timing
from attnbench.config.schema import validate_config, validate_section
from attnbench.config.plugins import resolve_plugin_paths
from attnbench.execute.child import ChildProcess
from attnbench.record.rows import base_row, describe
from attnbench.record.rundir import write_config
from attnbench.record.store import RowStore

STARTUP_TIMEOUT_S = 600.0


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM ended the sweep; finished rows are kept and the same run_id resumes it."""

    def __init__(self, signum: int, run_dir: Path, recorded: int, planned: int):
        self.signum, self.run_dir = signum, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}: {recorded} of {planned} cases recorded in {run_dir}; run the same "
                         f"command with run_id={run_dir.name} to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class WorkerDied(Exception):
    def __init__(self, status: str, reason: str):
        self.status, self.reason = status, reason
        super().__init__(reason)


class Worker(ChildProcess):
    """One worker subprocess bound to a device (``execute.worker``)."""

    module = "attnbench.execute.worker"
    label = "worker"

    def __init__(self, device: str, init: dict, log_path: Path):
        super().__init__(init, log_path)
        self.device = device

    def start(self) -> dict:
        self.spawn()
        self.phase = "worker start"
        message = self.receive(STARTUP_TIMEOUT_S)
        if message.get("type") != "ready":
            raise WorkerDied("error", message.get("reason", "worker failed to start"))
        return message

    def receive(self, timeout_s: float) -> dict:
        """The next message other than ``phase`` (recorded), or ``WorkerDied`` on timeout or death."""
        deadline = time.monotonic() + timeout_s
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise WorkerDied("timeout", f"no result after {timeout_s:.0f} s (phase: {self.phase}); worker killed")
            ready, _, _ = select.select([self.from_child], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(self.from_child, 1 << 16)
            if not chunk:
                raise WorkerDied("crashed", self.death())
            self.pending.extend(self.messages(chunk))
        return self.pending.pop(0)

    def run(self, case: Case, run_id: str, timeout_s: float) -> tuple[dict, bool]:
        """(row, worker still usable)."""
        self.phase = "queued"
        self.send({"type": "case", "case": case.to_dict(), "run_id": run_id})
        message = self.receive(timeout_s)
        if message.get("type") != "row":
            raise WorkerDied("error", f"unexpected message from worker: {message}")
        return message["row"], not message.get("replace", False)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.send({"type": "stop"})
            self.proc.wait(timeout=30)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        self.kill()


def default_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def worker_options(cfg: dict) -> dict:
    correctness = validate_section(cfg, "correctness")
    timing = validate_timing(cfg)
    options = {
        "timing": timing,
        "ref_chunk_bytes": int(correctness["ref_chunk_mb"] * 2**20),
        "energy_window_ms": float(timing["energy_window_ms"]),
        "flex_block_size": int(cfg.get("flex_block_size", 128)),
        "method_options": dict(cfg.get("method_options") or {}),
    }
    if correctness.get("tolerance"):
        options["tolerance"] = dict(correctness["tolerance"])
    if correctness.get("ref_full_pairs"):
        options["ref_full_pairs"] = int(correctness["ref_full_pairs"])
    if correctness.get("grad_prefix_min"):
        options["grad_prefix_min"] = int(correctness["grad_prefix_min"])
    options.update(plan_options(cfg))
    return options


class _Sweep:
    """What the device threads share: the case queue, the store, the stop flag and the live workers."""

    def __init__(self, groups, run_dir, run_id, timeout_s, store, progress, stats):
        self.groups, self.run_dir, self.run_id, self.timeout_s = groups, run_dir, run_id, timeout_s
        self.store, self.progress, self.stats = store, progress, stats
        self.stop = threading.Event()
        self.workers: dict[str, Worker] = {}
        self.lock = threading.Lock()

    def kill_workers(self) -> None:
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            proc = worker.proc
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _device_thread(device: str, init: dict, sweep: _Sweep) -> None:
    log_path = sweep.run_dir / "logs" / f"worker-{device.replace(':', '')}.log"
    worker = None
    identity: dict = {}  # the device as the worker saw it (name, GPU UUID, PCI bus id), kept across restarts

    def track(current):
        with sweep.lock:
            if current is None:
                sweep.workers.pop(device, None)
            else:
                sweep.workers[device] = current

    while not sweep.stop.is_set():
        try:
            group = sweep.groups.get_nowait()
        except queue.Empty:
            break
        for case in group:
            if sweep.stop.is_set():
                break
            sweep.progress.set_postfix_str(f"{case.method} {case.mask} {case.seq_q}x{case.seq_kv} {case.mode}",
                                           refresh=False)
            started, started_at = time.perf_counter(), envinfo.now()
            try:
                if worker is None:
                    worker = Worker(device, init, log_path)
                    track(worker)
                    ready = worker.start()
                    if sweep.stop.is_set():  # interrupted while it started
                        break
                    if ready.get("calibration"):
                        sweep.stats["calibration"] = ready["calibration"]
                    identity = ready.get("identity") or identity
                    sweep.stats["devices"][device] = {**identity, "calibration": ready.get("calibration")}
                row, usable = worker.run(case, sweep.run_id, sweep.timeout_s)
                if not usable:
                    worker.kill()
                    worker = None
                    track(None)
            except WorkerDied as died:
                if worker is not None:
                    worker.kill()
                worker = None
                track(None)
                if sweep.stop.is_set():  # killed by the interrupt: the case has no verdict, it runs on resume
                    break
                try:
                    row = describe(case, sweep.run_id)
                except Exception:
                    row = base_row(case, sweep.run_id)
                row.update(status=died.status, reason=died.reason, wall_s=time.perf_counter() - started)
            row["started_at"] = started_at
            if row.get("device") is None:
                row["device"] = identity.get("name")
            sweep.store.append({**row, **sweep.stats["stamp"], "gpu_uuid": identity.get("uuid"),
                                "gpu_pci_bus_id": identity.get("pci_bus_id")})
            sweep.progress.update(1)
    if worker is not None:
        if sweep.stop.is_set():
            worker.kill()
        else:
            worker.stop()
        track(None)


@contextlib.contextmanager
def _interrupts_stop(sweep: _Sweep):
    """While the sweep runs, SIGINT and SIGTERM set the stop flag and kill the workers (main thread only)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, frame):
        caught.append(signum)
        sweep.stop.set()
        sweep.kill_workers()

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def run_plan(plan: Plan, cfg: dict, run_dir: Path, run_id: str, command: str, show_progress: bool = True) -> Path:
    from tqdm import tqdm

    checked = validate_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    store = RowStore(run_dir, retry=tuple(checked["retry"]), method_options=checked.get("method_options"))
    for warning in store.warnings:
        print(f"attnbench: warning: {warning}", file=sys.stderr)
    check_resumed_options(store, plan, checked.get("method_options"))
    rows_before = len(store.rows)
    write_plan(run_dir, plan)
    invocation, facts = envinfo.begin_invocation(run_dir, run_id, command)  # env.json: one entry per invocation
    write_config(run_dir, cfg, invocation)
    stamp = {"host": facts["host"], "git_sha": facts["git_sha"], "git_dirty": facts["git_dirty"],
             "invocation": invocation}

    for case, reason in plan.unsupported:
        if case.case_id not in store.done:
            row = describe(case, run_id)
            row.update(status="unsupported", reason=reason, wall_s=0.0, started_at=envinfo.now(), **stamp)
            store.append(row)
    todo = [c for c in plan.runnable if c.case_id not in store.done]
    cp_todo = [c for c in todo if c.layout != "single"]  # CP hook: gangs run these after the single cases
    todo = [c for c in todo if c.layout == "single"]
    groups: queue.Queue = queue.Queue()
    current: list[Case] = []
    for case in todo:
        if current and case.input_key() != current[-1].input_key():
            groups.put(current)
            current = []
        current.append(case)
    if current:
        groups.put(current)

    options = worker_options(cfg)
    calibrate = checked["calibrate"] and plan.devices[0].startswith("cuda")
    stats: dict = {"stamp": stamp, "devices": {}}
    progress = tqdm(total=plan.total, initial=plan.total - len(todo), desc=run_id, unit="case",
                    disable=not show_progress, dynamic_ncols=True, file=sys.stderr)
    timeout_s = float(checked["case_timeout_s"])
    sweep = _Sweep(groups, run_dir, run_id, timeout_s, store, progress, stats)
    threads = []
    with _interrupts_stop(sweep) as caught:
        for device in plan.devices:
            init = {"type": "init", "device": device, "options": options,
                    "plugins": resolve_plugin_paths(checked["plugins"]), "calibrate": calibrate}
            thread = threading.Thread(target=_device_thread, daemon=True, args=(device, init, sweep))
            thread.start()
            threads.append(thread)
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)  # short waits: a signal is handled at once
    if cp_todo and not sweep.stop.is_set():
        from attnbench.cp.gang import run_cp_cases

        run_cp_cases(cp_todo, plan.devices, options, resolve_plugin_paths(checked["plugins"]), run_dir,
                     run_id, timeout_s, store, progress)
    progress.close()

    env = envinfo.end_invocation(run_dir, invocation, len(store.rows) - rows_before, stats["devices"],
                                 stats.get("calibration"))
    if caught:
        env["interrupted_at"] = envinfo.now()
        env["interrupted_by"] = signal.Signals(caught[0]).name
        env["invocations"][invocation]["interrupted_by"] = env["interrupted_by"]
        (run_dir / "env.json").write_text(json.dumps(env, indent=1, default=str))
    store.finalize()
    if caught:
        planned = {c.case_id for c in plan.runnable} | {c.case_id for c, _ in plan.unsupported}
        recorded = len(planned & {row["case_id"] for row in store.rows})  # this plan's cases, not the whole run's
        raise SweepInterrupted(caught[0], run_dir, recorded, len(planned))
    return run_dir


def run_sweep(cfg: dict, command: str, show_progress: bool = True) -> Path:
    """Validate, plan and run ``cfg`` (a plain dict); returns the run folder. Every check (types, unknown keys,
    the results folder, plugins, the plan) comes before anything is written."""
    from attnbench.config.plugins import load_plugins

    checked = validate_config(cfg)
    run_id = checked["run_id"] or default_run_id()
    run_dir = check_results_dir(Path(checked["results_dir"]), run_id)
    load_plugins(checked["plugins"])
    plan = build_plan(cfg)
    for note in plan.notes:
        print(f"attnbench: note: {note}", file=sys.stderr)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("results_dir", f"cannot write the run folder {run_dir}: {exc}") from None
    return run_plan(plan, cfg, run_dir, str(run_id), command, show_progress)


def check_resumed_options(store: RowStore, plan: Plan, method_options: dict | None) -> None:
    """A resumed run skips the cases it has rows for, and the case key holds no method options: resuming with
    other options for a method would silently keep rows measured with the old ones beside new ones. Refuse
    that before anything is written (``ConfigError`` naming ``method_options.<method>``)."""
    planned = {case.case_id: case.method for case in plan.runnable}
    planned.update({case.case_id: case.method for case, _ in plan.unsupported})
    done = {case_id for case_id in planned if case_id in store.done}
    if not done:
        return
    for method, recorded_sets in sorted(store.recorded_options(done).items()):
        current = dict((method_options or {}).get(method) or {})
        for recorded in recorded_sets:
            if recorded != current:
                raise ConfigError(f"method_options.{method}",
                                  f"{current or {}} differs from {recorded or {}}, the options this run's rows of "
                                  f"{method} were measured with (the case key does not hold method options, so a "
                                  "resume would keep those rows as done); use a new run_id, or the same options")


def check_results_dir(results_dir: Path, run_id: str) -> Path:
    """The run folder ``results_dir/run_id``, after checking (writing nothing) that it can be made there;
    ``ConfigError`` naming ``results_dir`` (or ``run_id``) otherwise."""
    if results_dir.exists() and not results_dir.is_dir():
        raise ConfigError("results_dir", f"{str(results_dir)!r} exists and is not a folder")
    existing = results_dir
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError("results_dir", f"{str(existing)!r} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError("results_dir", f"{str(results_dir)!r} cannot be made: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("results_dir", f"{str(results_dir)!r} is not writable (no write permission on "
                                         f"{str(existing)!r})")
    run_dir = results_dir / run_id
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("run_id", f"{str(run_dir)!r} exists and is not a folder")
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError("results_dir", f"the run folder {str(run_dir)!r} is not writable")
    return run_dir


def write_plan(run_dir: Path, plan: Plan) -> None:
    """plan.json: every planned case id, so a report can tell an interrupted run from a complete one."""
    path = run_dir / "plan.json"
    planned = set()
    if path.is_file():  # a resumed run with other axes plans more cases: keep the union
        try:
            planned = set(json.loads(path.read_text()).get("case_ids") or [])
        except ValueError:
            planned = set()
    planned |= {c.case_id for c in plan.runnable} | {c.case_id for c, _ in plan.unsupported}
    record = {"planned": len(planned), "case_ids": sorted(planned)}
    if plan.notes:
        record["notes"] = plan.notes
    path.write_text(json.dumps(record))
