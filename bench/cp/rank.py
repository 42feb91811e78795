"""One rank of a CP gang: ``python -m attnbench.cp.rank READ_FD WRITE_FD [PARENT_PID]``.

Protocol (JSON lines over two pipes, as ``execute.worker``): parent -> rank ``init`` (rank, world size,
backend, port, device, options, plugins), then ``case`` messages; rank -> parent ``ready``, ``phase``,
``result`` (rank 0 carries the row; the others an acknowledgement). A rank whose case raised reports it
(``error``) and exits: its peers may be stuck in a collective, so the parent replaces the whole gang.
Rank and world size may also come from the environment (``torchrun``: RANK/WORLD_SIZE/LOCAL_RANK; Slurm:
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) — see ``cluster``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback


def main(argv: list[str]) -> int:
    from attnbench.execute.worker import die_with_parent, start_watchdog

    parent_pid = int(argv[2]) if len(argv) > 2 else os.getppid()
    die_with_parent(parent_pid)  # a rank dies with the runner, however the runner ends (as a worker does)
    start_watchdog(parent_pid, int(argv[0]))
    inbox = os.fdopen(int(argv[0]), "r", buffering=1)
    outbox = os.fdopen(int(argv[1]), "w", buffering=1)

    def send(message: dict) -> None:
        outbox.write(json.dumps(message, default=str) + "\n")
        outbox.flush()

    init = json.loads(inbox.readline())
    from attnbench.execute.worker import _classify, _reason

    rank, world = int(init["rank"]), int(init["world"])
    try:
        import torch

        from attnbench.config.plugins import load_plugins

        load_plugins(init.get("plugins") or [])
        device = init["device"]
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        import datetime

        import torch.distributed as dist

        dist.init_process_group(init["backend"], init_method=f"tcp://{init.get('addr', '127.0.0.1')}:{init['port']}",
                                rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=float(init.get("timeout_s", 600))))
        from .rankcase import RankRunner

        runner = RankRunner(rank, world, device, init["options"])
        runner.phase_hook = lambda phase: send({"type": "phase", "phase": phase})
    except Exception as exc:  # noqa: BLE001
        send({"type": "fatal", "reason": f"rank {rank}: " + _reason(exc, "gang start"),
              "traceback": traceback.format_exc()})
        return 1
    send({"type": "ready", "rank": rank})

    from attnbench.config.plan import Case

    for line in inbox:
        message = json.loads(line)
        if message.get("type") == "stop":
            break
        case = Case.from_dict(message["case"])
        started = time.perf_counter()
        try:
            row = runner.run(case, message.get("run_id", ""))
            send({"type": "result", "rank": rank, "row": row})
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the case's status
            sys.stderr.write(traceback.format_exc())
            sys.stderr.flush()
            send({"type": "result", "rank": rank, "error": True, "status": _classify(exc),
                  "reason": f"rank {rank}: " + _reason(exc, runner.phase), "wall_s": time.perf_counter() - started})
            return 0
    try:
        import torch.distributed as dist

        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0


if __name__ == "__main__":
    from attnbench.execute.worker import exit_now

    exit_now(main(sys.argv[1:]))  # flushed, without the interpreter's teardown (the gang's stop waits for it)
