"""scripts/device_wrap.sh: a device call's outputs come back packed, and Triton's autotuning results travel between
calls (the carried .triton-cache is TRITON_CACHE_DIR; only *.autotune.json files come back)."""
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wrap_packs_outputs_and_brings_back_only_the_autotune_results(tmp_path):
    work = tmp_path / "work"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "device_wrap.sh", work / "scripts")
    (work / "job.sh").write_text(
        'mkdir -p "$TRITON_CACHE_DIR/abc" && echo "{}" > "$TRITON_CACHE_DIR/abc/k.autotune.json"\n'
        'head -c 1000 /dev/zero > "$TRITON_CACHE_DIR/abc/k.cubin"\n'
        'echo row > "$OUT/rows.txt"\n')
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "WRAP_S": "60"}
    done = subprocess.run(["bash", "scripts/device_wrap.sh", "job", "job.sh"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with tarfile.open(out / "job.tgz") as tar:
        assert "./rows.txt" in tar.getnames()
    with tarfile.open(out / "triton-autotune.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("k.autotune.json") for n in names) and not any(n.endswith(".cubin") for n in names)
    assert (work / ".triton-cache" / "abc" / "k.autotune.json").is_file()  # the job saw the carried cache dir
