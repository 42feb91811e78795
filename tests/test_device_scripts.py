"""The next device calls' scripts run to their end on the CPU with every command stubbed (python3 and timeout
answer 0): a variable a script uses under ``set -u`` without a default ends a device call at once, costing its
start-up (device_s8_sparse.sh lost its CT / RETRY / T1M defaults in a refactor and would have). The negative
control is a script that uses an unset variable."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLANNED = ["device_s18_oom_retry.sh", "device_s16.sh", "device_s15_sparse.sh", "device_s15_linear.sh", "device_s14_dense.sh", "device_s13_sparse.sh", "device_s13_linear.sh", "device_s12_sparse.sh", "device_s12_linear.sh", "device_s11_sparse.sh", "device_s11_sparse_b.sh", "device_s11_linear.sh", "device_s8_sparse.sh", "device_s10_linear.sh", "device_tasks_kernels.sh", "device_s9_fill.sh"]


def dry_run(script: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name in ("python3", "timeout"):
        (stubs / name).write_text("#!/bin/sh\nexit 0\n")
        (stubs / name).chmod(0o755)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    environ = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(out), "SITE": str(tmp_path / "site"),
               **env}
    return subprocess.run(["bash", str(script)], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", PLANNED)
def test_planned_device_script_has_every_variable(name, tmp_path):
    done = dry_run(ROOT / "scripts" / name, tmp_path, PART="a")
    assert "unbound variable" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr[-2000:]
    assert "== done after" in done.stdout


def test_an_unset_variable_is_caught(tmp_path):
    script = tmp_path / "broken.sh"
    script.write_text("set -u\n. scripts/device_env.sh\necho \"step $NOT_SET\"\necho '== done after 0s'\n")
    done = dry_run(script, tmp_path)
    assert "unbound variable" in done.stderr


@pytest.mark.parametrize("name, env", [
    ("device_s16.sh", {"S4": "520"}),
    ("device_s15_sparse.sh", {"P3": "400", "P4": "240", "P5": "150"}),  # the optional steps' branches too
    ("device_s15_linear.sh", {"L3": "120"}),
    ("device_s14_dense.sh", {"D1": "150", "D2": "180", "D3": "300", "D4": "140", "D5": "300"}),
])
def test_optional_steps_have_every_variable(name, env, tmp_path):
    done = dry_run(ROOT / "scripts" / name, tmp_path, **env)
    assert "unbound variable" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr[-2000:]
    assert "== done after" in done.stdout
