"""The parent side of a sweep: plan, start one worker per device, feed cases, collect rows, never lose one.

A case whose worker raises, runs out of memory, hangs past ``case_timeout_s`` or dies (segfault, illegal
memory access, ``os._exit``) still yields its row; the sweep goes on with a fresh worker. Rows are appended
to ``rows.jsonl`` as cases finish; running the same ``run_id`` again resumes and skips finished cases.
"""
from __future__ import annotations

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
from attnbench.config.plan import Case, Plan, build_plan, plan_options, validate_timing
from attnbench.config.plugins import resolve_plugin_paths
from attnbench.record.rows import base_row, describe
from attnbench.record.store import RowStore

STARTUP_TIMEOUT_S = 600.0


class WorkerDied(Exception):
    def __init__(self, status: str, reason: str):
        self.status, self.reason = status, reason
        super().__init__(reason)


class Worker:
    """One worker subprocess bound to a device, spoken to over two pipes."""

    def __init__(self, device: str, init: dict, log_path: Path):
        self.device, self.init, self.log_path = device, init, log_path
        self.proc = None
        self.phase = "start"
        self._buffer = b""

    def start(self) -> dict:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log = open(self.log_path, "ab")
        self.log_start = self.log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "attnbench.execute.worker", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            cwd=os.getcwd(), env=env, start_new_session=True,  # the user's directory: plugins resolve there
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.to_child = os.fdopen(to_child_w, "w", buffering=1)
        self.from_child = from_child_r
        self.phase = "worker start"
        self.send(self.init)
        message = self.receive(STARTUP_TIMEOUT_S)
        if message.get("type") != "ready":
            raise WorkerDied("error", message.get("reason", "worker failed to start"))
        return message

    def send(self, message: dict) -> None:
        self.to_child.write(json.dumps(message) + "\n")
        self.to_child.flush()

    def _stderr_tail(self, limit: int = 600) -> str:
        try:
            self.log.flush()
            with open(self.log_path, "rb") as handle:
                handle.seek(self.log_start)
                text = handle.read().decode(errors="replace")
        except OSError:
            return ""
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return " | ".join(lines[-4:])[-limit:]

    def receive(self, timeout_s: float) -> dict:
        """The next message other than ``phase`` (recorded), or ``WorkerDied`` on timeout or death."""
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                message = json.loads(line)
                if message.get("type") == "phase":
                    self.phase = message["phase"]
                    continue
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise WorkerDied("timeout", f"no result after {timeout_s:.0f} s (phase: {self.phase}); worker killed")
            ready, _, _ = select.select([self.from_child], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(self.from_child, 1 << 16)
            if chunk:
                self._buffer += chunk
                continue
            code = self.proc.wait()
            if code < 0:
                try:
                    how = f"signal {signal.Signals(-code).name}"
                except ValueError:
                    how = f"signal {-code}"
            else:
                how = f"exit code {code}"
            tail = self._stderr_tail()
            raise WorkerDied("crashed", f"worker died with {how} during {self.phase}" + (f"; stderr: {tail}" if tail else ""))

    def run(self, case: Case, run_id: str, timeout_s: float) -> tuple[dict, bool]:
        """(row, worker still usable)."""
        self.phase = "queued"
        self.send({"type": "case", "case": case.to_dict(), "run_id": run_id})
        message = self.receive(timeout_s)
        if message.get("type") != "row":
            raise WorkerDied("error", f"unexpected message from worker: {message}")
        return message["row"], not message.get("replace", False)

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        self.proc.wait()
        self.close()

    def close(self) -> None:
        for closer in (self.to_child.close, lambda: os.close(self.from_child), self.log.close):
            try:
                closer()
            except (OSError, ValueError):
                pass
        self.proc = None

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
    correctness = dict(cfg.get("correctness") or {})
    options = {
        "timing": validate_timing(cfg),
        "ref_chunk_bytes": int(correctness.get("ref_chunk_mb", 512)) * 2**20,
        "energy_window_ms": float((cfg.get("timing") or {}).get("energy_window_ms", 250.0)),
        "flex_block_size": int(cfg.get("flex_block_size", 128)),
    }
    if correctness.get("floor"):
        from attnbench.execute.case import ERROR_FLOOR

        options["error_floor"] = {**ERROR_FLOOR, **correctness["floor"]}
    options.update(plan_options(cfg))
    return options


def _device_thread(device, groups, init, run_dir, run_id, timeout_s, store, progress, stats):
    log_path = run_dir / "logs" / f"worker-{device.replace(':', '')}.log"
    worker = None
    while True:
        try:
            group = groups.get_nowait()
        except queue.Empty:
            break
        for case in group:
            progress.set_postfix_str(f"{case.method} {case.mask} {case.seq_q}x{case.seq_kv} {case.mode}", refresh=False)
            started, started_at = time.perf_counter(), envinfo.now()
            try:
                if worker is None:
                    worker = Worker(device, init, log_path)
                    ready = worker.start()
                    if ready.get("calibration"):
                        stats["calibration"] = ready["calibration"]
                row, usable = worker.run(case, run_id, timeout_s)
                if not usable:
                    worker.kill()
                    worker = None
            except WorkerDied as died:
                if worker is not None:
                    worker.kill()
                worker = None
                try:
                    row = describe(case, run_id)
                except Exception:
                    row = base_row(case, run_id)
                row.update(status=died.status, reason=died.reason, wall_s=time.perf_counter() - started)
            row["started_at"] = started_at
            store.append(row)
            progress.update(1)
    if worker is not None:
        worker.stop()


def run_plan(plan: Plan, cfg: dict, run_dir: Path, run_id: str, command: str, show_progress: bool = True) -> Path:
    from tqdm import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    store = RowStore(run_dir, retry=tuple(cfg.get("retry") or ()))
    write_plan(run_dir, plan)
    env_path = run_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else envinfo.collect(run_id, command)
    env.setdefault("commands", [])
    env["commands"].append(command)
    env["command"] = env.get("command") or command
    env_path.write_text(json.dumps(env, indent=1, default=str))

    for case, reason in plan.unsupported:
        if case.case_id not in store.done:
            row = describe(case, run_id)
            row.update(status="unsupported", reason=reason, wall_s=0.0, started_at=envinfo.now())
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
    calibrate = bool(cfg.get("calibrate", True)) and plan.devices[0].startswith("cuda")
    stats: dict = {}
    progress = tqdm(total=plan.total, initial=plan.total - len(todo), desc=run_id, unit="case",
                    disable=not show_progress, dynamic_ncols=True, file=sys.stderr)
    timeout_s = float(cfg.get("case_timeout_s", 300))
    threads = []
    for device in plan.devices:
        init = {"type": "init", "device": device, "options": options, "plugins": resolve_plugin_paths(cfg.get("plugins") or []),
                "calibrate": calibrate}
        thread = threading.Thread(target=_device_thread, daemon=True,
                                  args=(device, groups, init, run_dir, run_id, timeout_s, store, progress, stats))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if cp_todo:
        from attnbench.cp.gang import run_cp_cases

        run_cp_cases(cp_todo, plan.devices, options, resolve_plugin_paths(cfg.get("plugins") or []), run_dir,
                     run_id, timeout_s, store, progress)
    progress.close()

    env = json.loads(env_path.read_text())
    env["finished_at"] = envinfo.now()
    if stats.get("calibration"):
        env["calibration"] = stats["calibration"]
    env_path.write_text(json.dumps(env, indent=1, default=str))
    store.finalize()
    return run_dir


def run_sweep(cfg: dict, command: str, show_progress: bool = True) -> Path:
    """Validate, plan and run ``cfg`` (a plain dict); returns the run folder."""
    from attnbench.config.plugins import load_plugins

    load_plugins(cfg.get("plugins") or [])
    plan = build_plan(cfg)
    run_id = cfg.get("run_id") or default_run_id()
    run_dir = Path(cfg.get("results_dir") or "results") / str(run_id)
    write_config(run_dir, cfg)
    return run_plan(plan, cfg, run_dir, str(run_id), command, show_progress)


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
    path.write_text(json.dumps({"planned": len(planned), "case_ids": sorted(planned)}))


def write_config(run_dir: Path, cfg: dict) -> None:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if path.is_file():
        previous = yaml.safe_load(path.read_text()) or {}
        if {k: v for k, v in previous.items() if k != "run_id"} != {k: v for k, v in cfg.items() if k != "run_id"}:
            # a resumed run with other settings keeps both: the earlier config is never overwritten silently
            stamp = default_run_id()
            path.rename(run_dir / f"config.{stamp}.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
