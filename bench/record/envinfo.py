"""The environment of a run, for env.json: versions, GPUs, driver, git SHA, host, the command."""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

PACKAGES = ("torch", "triton", "hydra-core", "omegaconf", "pandas", "pyarrow", "numpy", "matplotlib",
            "nvidia-ml-py", "flash-attn", "fla-core", "yunchang", "xformers", "attnbench")
REPO = Path(__file__).resolve().parents[1]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def collect(run_id: str, command: str) -> dict:
    import torch

    from attnbench.measure.telemetry import gpu_inventory

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    gpus = gpu_inventory()
    cuda_ok = torch.cuda.is_available()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "run_id": run_id,
        "command": command,
        "started_at": now(),
        "finished_at": None,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": packages.get("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda_ok else None,
        "driver": gpus[0]["driver"] if gpus else None,
        # a copy of the tree without .git (the lent GPU machine) passes the SHA in ATTNBENCH_GIT_SHA
        "git_sha": _git("rev-parse", "HEAD") or os.environ.get("ATTNBENCH_GIT_SHA"),
        "git_dirty": None if status is None else bool(status),
        "packages": packages,
        "gpus": gpus,
        "device": torch.cuda.get_device_name(0) if cuda_ok else "cpu",
        "calibration": None,
    }
