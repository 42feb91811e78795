"""The worker: one subprocess per device, running cases sent by the parent (bench.runner).

Protocol: JSON lines over two pipes (file descriptors given on the command line), so nothing a library
prints can corrupt it. Parent → worker: ``init`` then ``case`` messages. Worker → parent: ``ready``,
``phase`` (for timeout reasons), ``row``. A case that raised (OOM included) gets its row with
``replace: true`` and the worker exits, so no state a failure left behind reaches a later case.
"""
from __future__ import annotations

import json
import re
import os
import sys
import time
import traceback


def _classify(exc: BaseException) -> str:
    import torch

    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower() or "CUDNN_STATUS_ALLOC" in text:
        return "oom"
    return "error"


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
    sys.exit(main(sys.argv[1:]))
