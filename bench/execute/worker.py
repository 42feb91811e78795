"""The worker: one subprocess per device, running cases sent by the parent (bench.runner).

Protocol: JSON lines over two pipes (file descriptors given on the command line), so nothing a library
prints can corrupt it. Parent → worker: ``init`` then ``case`` messages. Worker → parent: ``ready``,
``phase`` (for timeout reasons), ``row``. A case that raised (OOM included) gets its row with
``replace: true`` and the worker exits, so no state a failure left behind reaches a later case.

The worker dies with its parent, however the parent ends (SIGKILL included): on Linux the kernel sends it
SIGKILL when the parent thread that started it exits (``prctl(PR_SET_PDEATHSIG)``); everywhere, a watchdog
thread ends it within a second once its parent is gone or the parent's end of the pipe is closed.
"""
from __future__ import annotations

import json
import re
import os
import select
import signal
import sys
import threading
import time
import traceback

PR_SET_PDEATHSIG = 1
WATCHDOG_PERIOD_S = 0.5
CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def _classify(exc: BaseException) -> str:
    """``oom`` for an allocation failure on any device (CUDA, cuDNN, the CPU allocator, Python's MemoryError),
    ``error`` otherwise. A mask refusing a dense form over its budget (``MaskTooLarge``) is not an OOM."""
    import torch

    from attnbench.masks import MaskTooLarge

    text = str(exc)
    if isinstance(exc, MaskTooLarge):
        return "error"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "oom"
    if "out of memory" in text.lower() or "CUDNN_STATUS_ALLOC" in text or any(m in text for m in CPU_OOM):
        return "oom"
    return "error"


def die_with_parent(parent_pid: int | None) -> None:
    """Ask the kernel for SIGKILL when the parent goes (Linux), and exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog still covers it
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the request above took effect


def parent_lost(parent_pid: int, inbox_fd: int) -> bool:
    """True when the parent process is gone (this process was re-parented) or closed its end of the pipe.
    While a case runs the parent sends nothing, so a hang-up on the inbox means the parent is gone."""
    if os.getppid() != parent_pid:
        return True
    poller = select.poll()
    poller.register(inbox_fd, select.POLLHUP | select.POLLERR)
    return any(event & (select.POLLHUP | select.POLLERR) for _, event in poller.poll(0))


def start_watchdog(parent_pid: int, inbox_fd: int, on_lost=None, period_s: float = WATCHDOG_PERIOD_S):
    """A daemon thread that calls ``on_lost`` (default: exit at once) when ``parent_lost``; returns it."""

    def watch():
        while not parent_lost(parent_pid, inbox_fd):
            time.sleep(period_s)
        (on_lost or (lambda: os._exit(1)))()

    thread = threading.Thread(target=watch, name="attnbench-parent-watchdog", daemon=True)
    thread.start()
    return thread


def exit_now(code: int) -> None:
    """End this child process now, its streams flushed, skipping the interpreter's teardown: its rows are sent
    and nothing is left to do, while tearing down torch and every method module costs ~0.5 s of CPU that the
    parent waits for at every sweep's end (``Worker.stop``, ``Gang.stop``)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)  # what C libraries printed into the log
    except (OSError, AttributeError):
        pass
    os._exit(code)


ROOT_CAUSE = re.compile(r"^\s*[\w.]*(Error|Exception)\b\s*[(:]")


def _reason(exc: BaseException, phase: str) -> str:
    """The exception's first line and, when its message is a long report (Inductor, Triton), the innermost
    ``SomethingError: ...`` line in it: the cause a reader needs, not the first frame of a trace."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    cause = next((line for line in reversed(lines[1:]) if ROOT_CAUSE.match(line)), None)
    text = f"{type(exc).__name__} during {phase}: {first}"
    if cause and cause not in first:
        text += f" [cause: {cause}]"
    return text[:2000]


def main(argv: list[str]) -> int:
    read_fd, write_fd = int(argv[0]), int(argv[1])
    parent_pid = int(argv[2]) if len(argv) > 2 else os.getppid()
    die_with_parent(parent_pid)
    start_watchdog(parent_pid, read_fd)
    inbox = os.fdopen(read_fd, "r", buffering=1)
    outbox = os.fdopen(write_fd, "w", buffering=1)

    def send(message: dict) -> None:
        outbox.write(json.dumps(message, default=str) + "\n")
        outbox.flush()

    init = json.loads(inbox.readline())
    try:
        from attnbench.config.plugins import load_plugins

        load_plugins(init.get("plugins") or [])
        options = init["options"]
        device = init["device"]
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(device)
            if init.get("calibrate"):
                from attnbench.measure.calibrate import calibration

                options["calibration"] = calibration(torch.device(device))
        from attnbench.execute.case import CaseRunner

        runner = CaseRunner(device, options)
        runner.phase_hook = lambda phase: send({"type": "phase", "phase": phase})
    except Exception as exc:
        send({"type": "fatal", "reason": _reason(exc, "worker start"), "traceback": traceback.format_exc()})
        return 1
    from attnbench.measure.telemetry import device_identity

    send({"type": "ready", "calibration": options.get("calibration"), "identity": device_identity(device)})

    from attnbench.config.plan import Case
    from attnbench.record.rows import base_row, describe

    for line in inbox:
        message = json.loads(line)
        if message.get("type") == "stop":
            break
        case = Case.from_dict(message["case"])
        started = time.perf_counter()
        try:
            row = runner.run(case, message.get("run_id", ""))
            send({"type": "row", "row": row})
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a row
            try:
                row = describe(case, message.get("run_id", ""), runner.device_name)
            except Exception:  # the mask itself may be what failed
                row = base_row(case, message.get("run_id", ""))
            row.update(status=_classify(exc), reason=_reason(exc, runner.phase), device=runner.device_name,
                       wall_s=time.perf_counter() - started)
            sys.stderr.write(traceback.format_exc())
            sys.stderr.flush()
            send({"type": "row", "row": row, "replace": True})
            return 0
    return 0


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
