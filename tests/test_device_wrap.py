"""scripts/device_wrap.sh: a device call's outputs come back packed, and Triton's autotuning results travel between
calls (the carried .triton-cache is TRITON_CACHE_DIR; only *.autotune.json files come back)."""
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _wrap(work: Path, out: Path) -> subprocess.CompletedProcess:
    """``bash scripts/device_wrap.sh job job.sh`` in ``work`` with ``$OUT`` = ``out`` (made if missing)."""
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OUT": str(out), "WRAP_S": "60"}
    return subprocess.run(["bash", "scripts/device_wrap.sh", "job", "job.sh"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_wrap_packs_outputs_and_brings_back_only_the_autotune_results(tmp_path):
    work = tmp_path / "work"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "device_wrap.sh", work / "scripts")
    (work / "job.sh").write_text(
        'mkdir -p "$TRITON_CACHE_DIR/abc" && echo "{}" > "$TRITON_CACHE_DIR/abc/k.autotune.json"\n'
        'head -c 1000 /dev/zero > "$TRITON_CACHE_DIR/abc/k.cubin"\n'
        'echo row > "$OUT/rows.txt"\n')
    out = tmp_path / "out"
    done = _wrap(work, out)
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


def test_the_committed_autotune_cache_is_unpacked_on_the_device_and_carried_files_win(tmp_path):
    """A fresh checkout has no .triton-cache (git-ignored): the wrap unpacks scripts/device-cache's tuned configs
    into it, without overwriting a carried file of the same name; and refresh_autotune_cache.sh folds a call's
    tarball into the committed one. Control: without the committed tarball the job finds nothing."""
    work = tmp_path / "work"
    (work / "scripts" / "device-cache").mkdir(parents=True)
    for script in ("device_wrap.sh", "refresh_autotune_cache.sh"):
        shutil.copy(REPO / "scripts" / script, work / "scripts")
    seed = tmp_path / "seed"
    (seed / "h1").mkdir(parents=True)
    (seed / "h1" / "old.autotune.json").write_text("committed")
    (seed / "h1" / "carried.autotune.json").write_text("committed")
    with tarfile.open(work / "scripts" / "device-cache" / "triton-autotune.tgz", "w:gz") as tar:
        tar.add(seed / "h1", arcname="./h1")
    (work / ".triton-cache" / "h1").mkdir(parents=True)
    (work / ".triton-cache" / "h1" / "carried.autotune.json").write_text("carried")
    (work / "job.sh").write_text('cat "$TRITON_CACHE_DIR/h1/old.autotune.json" "$TRITON_CACHE_DIR/h1/carried.autotune.json" '
                                 '> "$OUT/seen.txt"\n')
    out = tmp_path / "out"
    done = _wrap(work, out)
    assert done.returncode == 0, done.stderr
    with tarfile.open(out / "job.tgz") as tar:
        assert tar.extractfile("./seen.txt").read().decode() == "committedcarried"

    # refresh: a call's new tuned kernel joins the committed tarball
    call = tmp_path / "call"
    (call / "h2").mkdir(parents=True)
    (call / "h2" / "new.autotune.json").write_text("new")
    with tarfile.open(call / "triton-autotune.tgz", "w:gz") as tar:
        tar.add(call / "h2", arcname="./h2")
    done = subprocess.run(["bash", "scripts/refresh_autotune_cache.sh", str(call)], cwd=work, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with tarfile.open(work / "scripts" / "device-cache" / "triton-autotune.tgz") as tar:
        names = sorted(n for n in tar.getnames() if n.endswith(".json"))
    assert names == ["./h1/carried.autotune.json", "./h1/old.autotune.json", "./h2/new.autotune.json"]

    # control: no committed tarball, no carried cache -> the job sees no tuned config
    shutil.rmtree(work / ".triton-cache")
    (work / "scripts" / "device-cache" / "triton-autotune.tgz").unlink()
    done = _wrap(work, out)
    with tarfile.open(out / "job.tgz") as tar:
        assert tar.extractfile("./seen.txt").read().decode() == ""
