"""The parent side of CP cases: a gang of N rank processes per world size, fed CP cases by the runner.

``run_cp_cases`` is the runner's hook: after the single-device cases (so a CP row can be compared with the
same case on one device), CP cases run grouped by world size, each group on one gang. A gang is N
``attnbench.cp.rank`` processes joined by a process group (NCCL on GPUs, gloo on CPU) over TCP on this
host; rank r uses the plan's r-th device. Every rank gets every case; rank 0 sends the row.

A rank that raises, runs out of memory, hangs past ``case_timeout_s`` or dies gives the case its status
(``error``, ``oom``, ``timeout``, ``crashed``; the reason names the rank) and the gang is replaced: its
peers may be blocked in a collective, and a failed case must leave nothing behind. ``unsupported`` and
``wrong`` verdicts are reached by every rank alike and keep the gang.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from attnbench.config.plan import Case
from attnbench.execute.child import ChildProcess
from attnbench.record import envinfo
from attnbench.record.rows import base_row, describe

STARTUP_TIMEOUT_S = 600.0
GRACE_S = 5.0  # after one rank fails, how long the others get to report before the gang is killed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GangFailed(Exception):
    def __init__(self, status: str, reason: str):
        self.status, self.reason = status, reason
        super().__init__(reason)


class RankProcess(ChildProcess):
    """One rank subprocess (``cp.rank``), started and spoken to like a device worker."""

    module = "attnbench.cp.rank"

    def __init__(self, rank: int, init: dict, log_path: Path):
        super().__init__(init, log_path)
        self.rank = rank
        self.label = f"rank {rank}"

    def start(self) -> None:
        self.spawn()


class Gang:
    """N rank processes joined by one process group."""

    def __init__(self, world: int, devices: list[str], options: dict, plugins: list, log_dir: Path,
                 timeout_s: float = 600.0):
        backend = "nccl" if devices[0].startswith("cuda") else "gloo"
        port = free_port()
        self.world = world
        self.ranks = []
        for rank in range(world):
            init = {"type": "init", "rank": rank, "world": world, "backend": backend, "port": port,
                    "device": devices[rank] if devices[0].startswith("cuda") else "cpu", "options": options,
                    "plugins": plugins, "timeout_s": timeout_s}
            self.ranks.append(RankProcess(rank, init, log_dir / f"cp{world}-rank{rank}.log"))

    def start(self) -> None:
        for rank in self.ranks:
            rank.start()
        replies = self.collect(STARTUP_TIMEOUT_S, "gang start")
        fatal = [m for m in replies.values() if m.get("type") != "ready"]
        if fatal:
            raise GangFailed("error", fatal[0].get("reason", "gang failed to start"))

    def collect(self, timeout_s: float, what: str) -> dict[int, dict]:
        """One message from every rank; ``GangFailed`` when one fails, dies or the time runs out."""
        deadline = time.monotonic() + timeout_s
        replies: dict[int, dict] = {}
        failure: tuple[str, str] | None = None
        by_fd = {rank.from_child: rank for rank in self.ranks}
        while len(replies) < self.world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if failure is not None:
                    break
                missing = [r.rank for r in self.ranks if r.rank not in replies]
                phases = ", ".join(f"rank {r.rank}: {r.phase}" for r in self.ranks if r.rank not in replies)
                raise GangFailed("timeout", f"no result from rank(s) {missing} after {timeout_s:.0f} s "
                                 f"({phases}); gang killed")
            waiting = [fd for fd, rank in by_fd.items() if rank.rank not in replies]
            ready, _, _ = select.select(waiting, [], [], min(remaining, 1.0))
            for fd in ready:
                rank = by_fd[fd]
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    reason = rank.death()
                    replies[rank.rank] = {"type": "died", "reason": reason}
                    if failure is None:
                        failure = ("crashed", reason)
                        deadline = min(deadline, time.monotonic() + GRACE_S)
                    continue
                for message in rank.messages(chunk):
                    replies[rank.rank] = message
                    if (message.get("error") or message.get("type") == "fatal") and failure is None:
                        failure = (message.get("status", "error"), message.get("reason", f"{what} failed"))
                        deadline = min(deadline, time.monotonic() + GRACE_S)
        if failure is not None:
            raise GangFailed(*failure)
        return replies

    def run(self, case: Case, run_id: str, timeout_s: float) -> dict:
        for rank in self.ranks:
            rank.phase = "queued"
            rank.send({"type": "case", "case": case.to_dict(), "run_id": run_id})
        replies = self.collect(timeout_s, "case")
        return replies[0]["row"]

    def kill(self) -> None:
        for rank in self.ranks:
            rank.kill()

    def stop(self) -> None:
        for rank in self.ranks:
            if rank.proc is not None:
                try:
                    rank.send({"type": "stop"})
                except (OSError, ValueError):
                    pass
        for rank in self.ranks:
            if rank.proc is not None:
                try:
                    rank.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            rank.kill()


def single_case_of(case: Case) -> Case:
    """The same case on one device (the row a CP row's speed-up is measured against)."""
    import dataclasses

    return dataclasses.replace(case, layout="single", world_size=1)


def add_scaling(row: dict, case: Case, store) -> None:
    """speedup / efficiency against the same case's ok row on one device, when the run holds one; a flag
    when the speed-up exceeds the world size (an impossible figure)."""
    single_id = single_case_of(case).case_id
    single = next((r for r in reversed(store.rows) if r.get("case_id") == single_id), None)
    if row.get("status") != "ok" or not single or single.get("status") != "ok" or not single.get("ms_median"):
        return
    if not row.get("ms_median"):
        return
    row["single_ms"] = single["ms_median"]
    row["speedup"] = single["ms_median"] / row["ms_median"]
    row["efficiency"] = row["speedup"] / case.world_size
    if row["speedup"] > case.world_size:
        flags = [f for f in (row.get("flags") or "").split(";") if f]
        flags.append(f"speedup_above_world_size({row['speedup']:.2f} > {case.world_size})")
        row["flags"] = ";".join(flags)


def run_cp_cases(cases: list[Case], devices: list[str], options: dict, plugins: list, run_dir: Path, run_id: str,
                 timeout_s: float, store, progress=None) -> None:
    """Run CP cases, one gang per world size (replaced after any failure); append one row per case."""
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    by_world: dict[int, list[Case]] = {}
    for case in cases:
        by_world.setdefault(case.world_size, []).append(case)
    for world, group in sorted(by_world.items()):
        gang = None
        for case in group:
            if progress is not None:
                progress.set_postfix_str(f"{case.layout}x{world} {case.method} {case.mask} {case.seq_q} {case.mode}",
                                         refresh=False)
            started, started_at = time.perf_counter(), envinfo.now()
            try:
                if gang is None:
                    gang = Gang(world, devices, options, plugins, log_dir, timeout_s)
                    gang.start()
                row = gang.run(case, run_id, timeout_s)
            except GangFailed as failed:
                if gang is not None:
                    gang.kill()
                gang = None
                try:
                    row = describe(case, run_id)
                except Exception:  # noqa: BLE001 - the mask itself may be what failed
                    row = base_row(case, run_id)
                row.update(status=failed.status, reason=failed.reason)
            row["wall_s"] = time.perf_counter() - started
            row["started_at"] = started_at
            add_scaling(row, case, store)
            store.append(row)
            if progress is not None:
                progress.update(1)
        if gang is not None:
            gang.stop()
