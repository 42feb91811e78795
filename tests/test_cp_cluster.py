"""Across nodes: rank discovery from torchrun and Slurm environments, the generated srun / sbatch / submitit
configuration, and a launcher-started job run on this machine (two ranks with a Slurm step's environment)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from attnbench.cp import cluster
from attnbench.cp.gang import free_port

REPO = Path(__file__).resolve().parents[1]


def test_rank_discovery_from_the_environment():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}
    assert cluster.discover(torchrun) == cluster.RankEnv(3, 8, 3, "node7", 29400, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert cluster.discover(slurm) == cluster.RankEnv(5, 8, 1, "gpu07", 15000 + 123456 % 20000, "slurm")
    assert cluster.discover({**slurm, "MASTER_PORT": "2222"}).master_port == 2222
    # an salloc shell (no step), a single task, or a forced gang: the runner's own gangs
    assert cluster.discover({k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}) is None
    assert cluster.discover({**slurm, "SLURM_NTASKS": "1"}) is None
    assert cluster.discover({**torchrun, "ATTNBENCH_CP_LAUNCH": "gang"}) is None
    assert cluster.discover({}) is None


def test_slurm_node_lists():
    assert cluster.first_host("gpu[01-04,07],cpu1") == "gpu01"
    assert cluster.first_host("node12,node13") == "node12"
    assert cluster.first_host("a-b-3") == "a-b-3"


def test_generated_srun_sbatch_and_submitit_configuration():
    command = cluster.srun_command(2, 4, ["sweep=cp", "run_id=cp8"])
    assert command[:5] == ["srun", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--kill-on-bad-exit=1"]
    assert command[5:] == ["attnbench", "cp=[8]", "sweep=cp", "run_id=cp8"]
    script = cluster.sbatch_script(2, 4, ["sweep=cp"])
    assert script.startswith("#!/bin/bash\n") and "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
    assert script.strip().endswith("attnbench 'cp=[8]' sweep=cp")
    overrides = cluster.submitit_overrides(2, 4, partition="h200", timeout_min=30)
    assert overrides[0] == "hydra/launcher=submitit_slurm"
    assert {"hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.partition=h200", "hydra.launcher.timeout_min=30", "cp=[8]"} <= set(overrides)


def test_a_launcher_started_job_runs_its_cp_cases_in_lockstep(tmp_path):
    """Two processes started as one Slurm step would start them: each discovers its rank, rank 0 runs the
    single-device case and writes every row."""
    port = free_port()
    args = [sys.executable, "-m", "attnbench.cli", "sweep=smoke", f"results_dir={tmp_path}", "run_id=job",
            "methods=[sdpa_math]", "masks=[causal]", "seq_lens=[24]", "cross_lens=[]", "modes=[fwd_bwd]",
            "heads_q=2", "heads_kv=2", "head_dim=8", "batch=1", "device=cpu", "layouts=[single,ring]", "cp=[2,4]",
            "timing.budget_ms=1", "timing.min_reps=1", "timing.max_reps=2", "timing.warmup_ms=0"]
    procs = []
    for rank in range(2):
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2",
               "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    frame = pd.read_parquet(tmp_path / "job" / "rows.parquet").set_index(["layout", "world_size"])
    assert frame.loc[("single", 1), "status"] == "ok"
    assert frame.loc[("ring", 2), "status"] == "ok" and frame.loc[("ring", 2), "rel_err"] < 1e-5
    assert frame.loc[("ring", 2), "speedup"] > 0
    assert frame.loc[("ring", 4), "status"] == "unsupported" and "this job has 2 ranks" in frame.loc[("ring", 4), "reason"]
    assert "cases: ok" in outputs[0][0] and "cases: ok" not in outputs[1][0]  # rank 0 alone reports
