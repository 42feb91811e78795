"""A child process of the runner, spoken to over two pipes with JSON lines: the device workers
(``execute.worker``) and the ranks of a context-parallel gang (``cp.rank``) are both started this way.

The child is started as ``python -m MODULE READ_FD WRITE_FD PARENT_PID`` in its own process session, in the
user's directory (plugins given by relative path resolve there), with stdout and stderr appended to a log.
It is expected to die with its parent (``execute.worker.die_with_parent`` and ``start_watchdog``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


class ChildProcess:
    """Spawn, send, parse replies (``phase`` messages are recorded, not returned), describe a death, kill."""

    module = ""  # the ``python -m`` module the child runs
    label = "child"  # how reasons name it ("worker", "rank 1")

    def __init__(self, init: dict, log_path: Path):
        self.init, self.log_path = init, log_path
        self.proc = None
        self.phase = "start"
        self.buffer = b""  # bytes read but not yet a whole line
        self.pending: list[dict] = []  # whole messages not yet handed out (Worker.receive)

    def spawn(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log = open(self.log_path, "ab")
        self.log_start = self.log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, str(to_child_r), str(from_child_w), str(os.getpid())],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            cwd=os.getcwd(), env=env, start_new_session=True,  # the user's directory: plugins resolve there
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.to_child = os.fdopen(to_child_w, "w", buffering=1)
        self.from_child = from_child_r
        self.send(self.init)

    def send(self, message: dict) -> None:
        self.to_child.write(json.dumps(message) + "\n")
        self.to_child.flush()

    def messages(self, chunk: bytes) -> list[dict]:
        """The complete messages in what has been read so far, ``phase`` messages recorded in ``self.phase``."""
        self.buffer += chunk
        out = []
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)
            if message.get("type") == "phase":
                self.phase = message["phase"]
            else:
                out.append(message)
        return out

    def stderr_tail(self, limit: int = 600) -> str:
        """The last lines this child wrote to its log, for a reason."""
        try:
            self.log.flush()
            with open(self.log_path, "rb") as handle:
                handle.seek(self.log_start)
                text = handle.read().decode(errors="replace")
        except OSError:
            return ""
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return " | ".join(lines[-4:])[-limit:]

    def death(self) -> str:
        """Why the child is gone (it closed its pipe): exit code or signal, phase, and its last stderr lines."""
        code = self.proc.wait()
        if code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        else:
            how = f"exit code {code}"
        tail = self.stderr_tail()
        return f"{self.label} died with {how} during {self.phase}" + (f"; stderr: {tail}" if tail else "")

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
