"""The environment of a run, for env.json: versions, GPUs, driver, git SHA, host, the command.

A run folder may be written by several invocations (a resume, a resume with more axes, a retry on another
machine). env.json keeps one entry per invocation in ``invocations`` (its command, start and finish, host,
versions, git SHA and dirty flag, GPUs, the identity of each worker device, calibration and the rows it
wrote); every row's ``invocation`` column is its index there. The top-level keys describe the run as a whole:
``started_at`` of the first invocation, ``finished_at`` of the last, ``command`` the first command and
``commands`` all of them; the other facts (host, versions, git SHA, devices, calibration) are those of the
latest invocation that wrote rows, and ``mixed`` lists the facts on which the invocations differ.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
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


# per-invocation facts copied to the top level from the latest invocation that wrote rows
FACTS = ("host", "platform", "cpu", "python", "torch", "triton", "cuda", "cudnn", "driver", "git_sha", "git_dirty",
         "packages", "gpus", "device")
MIXED_CHECK = ("host", "python", "torch", "triton", "cuda", "cudnn", "driver", "git_sha", "git_dirty", "device")
LEGACY_NOTE = ("recorded before env.json kept one entry per invocation: host, versions and git SHA are the "
               "first invocation's, the calibration the last one's")


def read_env(run_dir: Path) -> dict:
    path = Path(run_dir) / "env.json"
    if not path.is_file():
        return {}
    loaded = json.loads(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def _write_env(run_dir: Path, env: dict) -> None:
    (Path(run_dir) / "env.json").write_text(json.dumps(env, indent=1, default=str))


def _legacy_invocations(env: dict) -> list[dict]:
    """An env.json of an older attnbench as invocation entries: its facts for the first command, and an entry
    with the command only for each later one (their facts were not recorded)."""
    if not env:
        return []
    commands = list(env.get("commands") or [env.get("command")])
    first = {key: env.get(key) for key in ("command", "started_at", "finished_at", *FACTS, "calibration")}
    first["command"] = commands[0] if commands else env.get("command")
    first["note"] = LEGACY_NOTE
    later = [{"command": command, "note": "its facts were not recorded (older attnbench)"} for command in commands[1:]]
    return [first, *later]


def begin_invocation(run_dir: Path, run_id: str, command: str) -> tuple[int, dict]:
    """Add this invocation to ``run_dir/env.json`` (created when missing); returns (its index, its entry)."""
    env = read_env(run_dir)
    if env and "invocations" not in env:
        env["invocations"] = _legacy_invocations(env)
    facts = collect(run_id, command)
    entry = {key: facts[key] for key in ("command", "started_at", "finished_at", *FACTS, "calibration")}
    entry.update(devices={}, rows_written=None)
    if not env:
        env = dict(facts)
        env["invocations"] = []
        env["commands"] = []
    env["invocations"].append(entry)
    env["commands"] = [*(env.get("commands") or []), command]
    env["command"] = env.get("command") or command
    env["run_id"] = run_id
    _write_env(run_dir, env)
    return len(env["invocations"]) - 1, entry


def end_invocation(run_dir: Path, index: int, rows_written: int, devices: dict | None = None,
                   calibration: dict | None = None) -> dict:
    """Close invocation ``index``: its finish time, rows written, worker devices and calibration; the
    top-level facts follow the latest invocation that wrote rows (module docstring)."""
    env = read_env(run_dir)
    entry = env["invocations"][index]
    entry.update(finished_at=now(), rows_written=rows_written, devices=devices or {})
    if calibration:
        entry["calibration"] = calibration
    env["finished_at"] = entry["finished_at"]
    if calibration:
        env["calibration"] = calibration
    summarize_invocations(env)
    _write_env(run_dir, env)
    return env


def summarize_invocations(env: dict) -> None:
    """The top-level facts of ``env`` follow the latest invocation that wrote rows (the first, when none did);
    ``mixed`` lists the facts on which the recorded invocations differ (after a resume, or a merge of folders:
    ``attnbench merge``)."""
    invocations = env.get("invocations") or []
    if invocations:
        writers = [e for e in invocations if e.get("rows_written")]
        latest = writers[-1] if writers else invocations[0]
        env.update({key: latest.get(key) for key in FACTS if key in latest})
    recorded = [e for e in invocations if "host" in e]
    mixed = {key: sorted({json.dumps(e.get(key)) for e in recorded}) for key in MIXED_CHECK}
    env["mixed"] = {key: [json.loads(v) for v in values] for key, values in mixed.items() if len(values) > 1}
