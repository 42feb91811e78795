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


def _tiny_wheel(folder: Path) -> None:
    """A hand-made wheel of one module ``tinyattn`` (a zip with its dist-info), so no build backend is needed."""
    import zipfile

    dist = "tinyattn-0.1.dist-info"
    files = {"tinyattn.py": "VALUE = 42\n",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: tinyattn\nVersion: 0.1\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(folder / "tinyattn-0.1-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def test_the_device_scripts_setup_installs_the_carried_wheels_and_stops_when_it_cannot(tmp_path):
    import sys

    work = tmp_path / "work"
    (work / "scripts").mkdir(parents=True)
    (work / ".whl").mkdir()
    shutil.copy(REPO / "scripts" / "device_env.sh", work / "scripts")
    _tiny_wheel(work / ".whl")
    bindir = tmp_path / "bin"  # `python3` in the script: this interpreter (it has pip)
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SITE": str(tmp_path / "site"),
           "PATH": f"{bindir}:{os.environ['PATH']}"}
    job = '. scripts/device_env.sh\npython3 -c "import tinyattn; print(tinyattn.VALUE)"\necho after\n'
    done = subprocess.run(["bash", "-c", job], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42", "after"]  # installed and on PYTHONPATH, and the script went on
    # control: no wheel to install -> the script ends there with the installer's words, nothing after it runs
    for wheel in (work / ".whl").iterdir():
        wheel.unlink()
    done = subprocess.run(["bash", "-c", job], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "after" not in done.stdout
