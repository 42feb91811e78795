"""Across nodes: ranks launched by Slurm (``srun``, or Hydra's submitit launcher) or ``torchrun``.

On one node the runner starts its own gangs (``gang``). When the processes are started by a launcher, every
process is one rank of a single job-wide gang instead: ``attnbench`` notices the launcher from the
environment (``discover``), joins the process group, plans the sweep (identically on every rank), and runs
the CP cases whose world size equals the job's in lockstep; rank 0 runs the single-device cases first
(its own worker subprocesses, isolated as usual) while the others wait, and writes every row. CP cases of
another world size get an ``unsupported`` row. A CP case that raises on a rank ends the job (its peers are
inside collectives); the same ``run_id`` resumes where it stopped.

Rank discovery, in order: torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
then a Slurm step (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_STEP_ID`` present; the master
is the first host of ``SLURM_JOB_NODELIST``, the port ``MASTER_PORT`` or 15000 + job id mod 20000).
``ATTNBENCH_CP_LAUNCH=gang`` forces the single-node gangs.

    # inside an allocation (salloc / sbatch): 2 nodes x 4 GPUs, one task per GPU
    srun --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 attnbench sweep=cp cp=[8] run_id=cp8
    # Hydra's submitit launcher (pip install hydra-submitit-launcher)
    attnbench -m hydra/launcher=submitit_slurm hydra.launcher.nodes=2 hydra.launcher.tasks_per_node=4 \\
        hydra.launcher.gpus_per_node=4 sweep=cp cp=[8]
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # torchrun or slurm


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[01-04,07],cpu1`` -> ``gpu01``."""
    nodelist = nodelist.strip()
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def discover(env: dict | None = None) -> RankEnv | None:
    """The launcher's rank layout, or None when this process was not started as one of several ranks."""
    env = dict(os.environ if env is None else env)
    if env.get("ATTNBENCH_CP_LAUNCH") == "gang":
        return None
    if "RANK" in env and "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) > 1:
        return RankEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        port = int(env.get("MASTER_PORT") or 15000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
        return RankEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or first_host(nodelist), port, "slurm")
    return None


def srun_command(nodes: int, gpus_per_node: int, overrides: list[str]) -> list[str]:
    """``srun`` inside an allocation: one task per GPU, every task an ``attnbench`` rank."""
    return ["srun", f"--nodes={nodes}", f"--ntasks-per-node={gpus_per_node}", f"--gpus-per-node={gpus_per_node}",
            "--kill-on-bad-exit=1", "attnbench", f"cp=[{nodes * gpus_per_node}]", *overrides]


def submitit_overrides(nodes: int, gpus_per_node: int, partition: str | None = None, timeout_min: int = 60) -> list[str]:
    """Hydra overrides that send a sweep through the submitit Slurm launcher, one task per GPU."""
    out = ["hydra/launcher=submitit_slurm", f"hydra.launcher.nodes={nodes}",
           f"hydra.launcher.tasks_per_node={gpus_per_node}", f"hydra.launcher.gpus_per_node={gpus_per_node}",
           f"hydra.launcher.timeout_min={timeout_min}", f"cp=[{nodes * gpus_per_node}]"]
    if partition:
        out.append(f"hydra.launcher.partition={partition}")
    return out


def sbatch_script(nodes: int, gpus_per_node: int, overrides: list[str], time_limit: str = "01:00:00") -> str:
    """A batch script running ``srun_command`` (submit with ``sbatch``)."""
    command = " ".join(shlex.quote(part) for part in srun_command(nodes, gpus_per_node, overrides))
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus_per_node}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --job-name=attnbench-cp",
        "set -euo pipefail",
        command,
        "",
    ])


def run_external(cfg: dict, command: str, ranks: RankEnv, show_progress: bool = False) -> Path:
    """Run ``cfg`` as one rank of a launcher-started job (see the module docstring). Returns the run folder."""
    import datetime
    import time

    import torch
    import torch.distributed as dist

    from attnbench.config.plan import Plan, build_plan
    from attnbench.config.plugins import load_plugins
    from attnbench.execute.runner import default_run_id, run_plan, worker_options
    from attnbench.record import envinfo
    from attnbench.record.rows import describe
    from attnbench.record.store import RowStore

    from .gang import add_scaling
    from .rankcase import RankRunner

    load_plugins(cfg.get("plugins") or [])
    cuda = torch.cuda.is_available()
    device = f"cuda:{ranks.local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{ranks.master_addr}:{ranks.master_port}",
                            rank=ranks.rank, world_size=ranks.world,
                            timeout=datetime.timedelta(hours=6))  # ranks > 0 wait while rank 0 runs singles
    try:
        plan = build_plan(cfg)
        box = [cfg.get("run_id") or default_run_id()]  # every rank takes rank 0's folder (multirun names differ)
        dist.broadcast_object_list(box, src=0)
        run_id = box[0]
        run_dir = Path(cfg.get("results_dir") or "results") / str(run_id)
        singles = [c for c in plan.runnable if c.layout == "single"]
        cp_cases = [c for c in plan.runnable if c.layout != "single"]
        if ranks.rank == 0:
            run_plan(Plan(singles, plan.unsupported, plan.devices), cfg, run_dir, str(run_id), command, show_progress)
        dist.barrier()
        store = RowStore(run_dir) if ranks.rank == 0 else None
        done = RowStore(run_dir).done if ranks.rank == 0 else set()
        box = [sorted(done)]
        dist.broadcast_object_list(box, src=0)
        done = set(box[0])
        runner = RankRunner(ranks.rank, ranks.world, device, worker_options(cfg))
        for case in cp_cases:
            if case.case_id in done:
                continue
            started, started_at = time.perf_counter(), envinfo.now()
            if case.world_size != ranks.world:
                row = describe(case, str(run_id)) if ranks.rank == 0 else None
                if row is not None:
                    row.update(status="unsupported", reason=f"world size {case.world_size}: this job has "
                               f"{ranks.world} ranks ({ranks.source})")
            else:
                row = runner.run(case, str(run_id))
            if ranks.rank == 0:
                row["wall_s"], row["started_at"] = time.perf_counter() - started, started_at
                add_scaling(row, case, store)
                store.append(row)
        if ranks.rank == 0:
            store.finalize()
        dist.barrier()
        return run_dir
    finally:
        dist.destroy_process_group()
