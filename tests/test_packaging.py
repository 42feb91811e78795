"""`pip install .` gives one working library, `attnbench`, and nothing else.

A non-editable install into a temporary folder, used from another directory by an interpreter that cannot see
the repository (the venv's base interpreter: no editable-install finder, deps taken from the venv's
site-packages on PYTHONPATH), runs a small sweep with the Hydra config shipped as package data; the generic
names the repository's folders carry (``masks``, ``bench``, ``methods``, ``tasks``) do not import. A static
check ties pyproject's explicit ``packages`` list and ``package-data`` globs to the folders on disk, so a new
subpackage or config file cannot be left out of the wheel unnoticed.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# data files the package needs at run time: (folder, suffix) -> must all be shipped
DATA = [("conf", ".yaml"), ("bench/report/templates", "")]


# ---- the static check: pyproject against the folders ------------------------------------------------------------
def _setuptools(pyproject: dict) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    table = pyproject["tool"]["setuptools"]
    return list(table["packages"]), dict(table["package-dir"]), dict(table.get("package-data", {}))


def _package_of(folder: Path, package_dir: dict[str, str], root: Path) -> str | None:
    """The import name setuptools gives ``folder`` through ``package-dir`` (the longest mapped prefix)."""
    rel = folder.relative_to(root).as_posix()
    best = None
    for name, path in package_dir.items():
        if rel == path or rel.startswith(path + "/"):
            if best is None or len(path) > len(package_dir[best]):
                best = name
    if best is None:
        return None
    rest = rel[len(package_dir[best]):].strip("/")
    return best + ("." + rest.replace("/", ".") if rest else "")


def _folder_of(package: str, package_dir: dict[str, str], root: Path) -> Path:
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return root.joinpath(package_dir[prefix], *parts[cut:])
    return root.joinpath(*parts)


def packaging_problems(pyproject: dict, root: Path) -> list[str]:
    """Everything the wheel would miss: an unlisted subpackage, a listed one that does not exist, a folder of
    modules without ``__init__.py``, a config or template file no ``package-data`` glob covers."""
    packages, package_dir, package_data = _setuptools(pyproject)
    problems = []
    found = set()
    for top in sorted(set(package_dir.values())):
        for folder in sorted(p for p in (root / top).rglob("*") if p.is_dir()) + [root / top]:
            if folder.name == "__pycache__" or "__pycache__" in folder.parts:
                continue
            has_init = (folder / "__init__.py").is_file()
            if not has_init and any(folder.glob("*.py")):
                problems.append(f"{folder.relative_to(root)}/ holds modules but no __init__.py")
            if has_init:
                name = _package_of(folder, package_dir, root)
                found.add(name)
                if name not in packages:
                    problems.append(f"{folder.relative_to(root)}/ is package {name!r}, missing from "
                                    "[tool.setuptools] packages in pyproject.toml")
    for name in packages:
        if name not in found:
            problems.append(f"[tool.setuptools] packages lists {name!r}, but "
                            f"{_folder_of(name, package_dir, root).relative_to(root)}/__init__.py does not exist")
    covered = set()
    for package, patterns in package_data.items():
        targets = packages if package in ("", "*") else [package]
        for target in targets:
            base = _folder_of(target, package_dir, root)
            for pattern in patterns:  # setuptools globs each pattern relative to the package's folder
                covered |= {(base / hit).resolve() for hit in glob.glob(pattern, root_dir=base)}
    for folder, suffix in DATA:
        for path in sorted((root / folder).rglob(f"*{suffix}")):
            if path.is_file() and "__pycache__" not in path.parts and path.resolve() not in covered:
                problems.append(f"{path.relative_to(root)} is not covered by any [tool.setuptools.package-data] glob")
    return problems


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_and_data_file_is_listed_in_pyproject():
    assert packaging_problems(_pyproject(), ROOT) == []


def test_the_packaging_check_sees_what_a_wheel_would_miss():
    """Negative controls: drop a subpackage, a data glob, or a listed folder, and the check says so."""
    pyproject = _pyproject()
    table = pyproject["tool"]["setuptools"]
    table["packages"] = [p for p in table["packages"] if p != "attnbench.methods.sparse"] + ["attnbench.nowhere"]
    table["package-data"]["attnbench.conf"] = ["*.yaml"]  # top level only: conf/sweep/*.yaml left out
    table["package-data"]["attnbench.report"] = []
    problems = "\n".join(packaging_problems(pyproject, ROOT))
    assert "methods/sparse/ is package 'attnbench.methods.sparse', missing" in problems
    assert "lists 'attnbench.nowhere'" in problems
    assert "conf/sweep/smoke.yaml is not covered" in problems
    assert "bench/report/templates/report.html.j2 is not covered" in problems
    assert "conf/config.yaml" not in problems  # still covered by "*.yaml"


# ---- the install ---------------------------------------------------------------------------------------------------
def _isolated_python() -> str:
    """An interpreter that does not process the venv's .pth files (so an editable install cannot leak in)."""
    base = getattr(sys, "_base_executable", sys.executable)
    return base if base and os.path.exists(base) else sys.executable


def _deps_path() -> list[str]:
    return [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install --no-deps --no-build-isolation --target SITE`` of a copy of the source tree (the build
    writes build/ and *.egg-info beside the sources; the copy keeps them out of the repository)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    _, package_dir, _ = _setuptools(_pyproject())
    for name in ["pyproject.toml", "README.md", "LICENSE", *sorted(set(package_dir.values()))]:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    target = tmp / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile", "-q",
         "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=120, cwd=tmp)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    elsewhere = tmp / "elsewhere"  # a directory with nothing of the repository in it
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *_deps_path()])
    env["PYTHONNOUSERSITE"] = "1"
    python = _isolated_python()
    probe = subprocess.run(
        [python, "-c", "import sys; print(any('editable' in repr(f).lower() for f in sys.meta_path))"],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60)
    assert probe.returncode == 0, probe.stderr
    if probe.stdout.strip() == "True":
        pytest.skip(f"{python} loads an editable-install finder (not a venv): cannot isolate the installed copy")
    return {"target": target, "cwd": elsewhere, "env": env, "python": python, "tmp": tmp}


def test_the_installed_package_runs_a_sweep_from_another_directory(installed):
    target, cwd, env, python = installed["target"], installed["cwd"], installed["env"], installed["python"]
    where = subprocess.run(
        [python, "-c", "import json, attnbench, attnbench.cli as cli; "
                       "print(json.dumps([attnbench.__file__, str(cli.CONF_DIR)]))"],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=60)
    assert where.returncode == 0, where.stderr
    package_file, conf_dir = json.loads(where.stdout)
    assert Path(package_file).resolve().is_relative_to(target.resolve()), package_file
    assert Path(conf_dir).resolve().is_relative_to(target.resolve()), conf_dir
    # the Hydra config and the report template are shipped: every file the repository has
    for folder, suffix in DATA:
        shipped = {p.relative_to(target / "attnbench").as_posix() for p in (target / "attnbench").rglob(f"*{suffix}")
                   if p.is_file()}
        rel_folder = folder.replace("bench/", "", 1) if folder.startswith("bench/") else folder
        for path in (ROOT / folder).rglob(f"*{suffix}"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert f"{rel_folder}/{path.relative_to(ROOT / folder).as_posix()}" in shipped, path
    # the console script points at the CLI
    entry_points = next(target.glob("attnbench-*.dist-info")).joinpath("entry_points.txt").read_text()
    assert "attnbench = attnbench.cli:main" in entry_points

    results = installed["tmp"] / "results"
    sweep = subprocess.run(
        [python, "-m", "attnbench.cli", "sweep=smoke", f"results_dir={results}", "run_id=installed",
         "methods=[sdpa_math]", "masks=[causal]", "seq_lens=[32]", "cross_lens=[]", "modes=[fwd]", "batch=1",
         "heads_q=2", "heads_kv=2", "head_dim=16", "timing.budget_ms=2", "timing.warmup_ms=0",
         "timing.min_reps=2", "timing.max_reps=3", "calibrate=false"],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=180)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    rows = [json.loads(line) for line in (results / "installed" / "rows.jsonl").read_text().splitlines()]
    assert [(r["method"], r["mask"], r["status"]) for r in rows] == [("sdpa_math", "causal", "ok")], rows
    assert not any(cwd.iterdir()), "the sweep wrote into the directory it ran from"


@pytest.mark.parametrize("name", ["masks", "bench", "methods", "tasks"])
def test_no_generic_top_level_name_is_installed(installed, name):
    result = subprocess.run([installed["python"], "-c", f"import {name}"], capture_output=True, text=True,
                            cwd=installed["cwd"], env=installed["env"], timeout=60)
    assert result.returncode != 0 and f"No module named '{name}'" in result.stderr, result.stderr
    assert not (installed["target"] / name).exists()


# ---- the Makefile's torch choice -------------------------------------------------------------------------------
STUB_PYTHON = """#!{bash}
# a stand-in for the venv's python: logs every call; imports torch only when HAS_TORCH is set; pip fails
# without --index-url when FIRST_PIP_FAILS is set (an index with no +cpu wheel, as PyPI)
echo "$*" >> "$CALLS"
if [ "$1" = "-c" ]; then [ -n "${{HAS_TORCH:-}}" ] && {{ echo 2.11.0; exit 0; }}; exit 1; fi
case "$*" in *--index-url*) exit 0;; esac
[ -n "${{FIRST_PIP_FAILS:-}}" ] && [ "$3" = "install" ] && [ "$5" != "-e" ] && exit 1
exit 0
"""
NVIDIA_SMI = {
    "gpu": "#!{bash}\necho 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n",
    "no_driver": "#!{bash}\necho 'NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.'\nexit 9\n",
}


def _make_install(tmp_path: Path, nvidia_smi: str | None, has_torch=False, first_pip_fails=False) -> list[str]:
    """Run the Makefile's real install recipe with a stub python (the venv's) and a stub nvidia-smi (or none)
    on a PATH holding nothing else; returns the stub python's calls, in order."""
    bash = shutil.which("bash")
    if shutil.which("make") is None or bash is None:
        pytest.skip("needs make and bash")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(STUB_PYTHON.format(bash=bash))
    python.chmod(0o755)
    stubs = tmp_path / "path"
    stubs.mkdir()
    for tool in ("bash", "grep", "touch"):  # what the recipe and the script use besides shell builtins
        (stubs / tool).symlink_to(shutil.which(tool))
    if nvidia_smi is not None:
        (stubs / "nvidia-smi").write_text(NVIDIA_SMI[nvidia_smi].format(bash=bash))
        (stubs / "nvidia-smi").chmod(0o755)
    calls = tmp_path / "calls.log"
    env = {"PATH": str(stubs), "CALLS": str(calls), "HOME": str(tmp_path)}
    if has_torch:
        env["HAS_TORCH"] = "1"
    if first_pip_fails:
        env["FIRST_PIP_FAILS"] = "1"
    make = subprocess.run([shutil.which("make"), "-C", str(ROOT), "install", f"VENV={venv}"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert make.returncode == 0, make.stdout + make.stderr
    assert (venv / ".installed").is_file()
    return [line.strip() for line in calls.read_text().splitlines()]


def _pip_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m pip install")]


def test_make_install_takes_the_cuda_build_where_nvidia_smi_lists_a_gpu(tmp_path):
    installs = _pip_installs(_make_install(tmp_path, "gpu"))
    assert installs == ["-m pip install -q torch>=2.11", '-m pip install -q -e .[test]'], installs


@pytest.mark.parametrize("nvidia_smi", [None, "no_driver"])
def test_make_install_takes_the_cpu_build_without_a_gpu(tmp_path, nvidia_smi):
    installs = _pip_installs(_make_install(tmp_path, nvidia_smi))
    assert installs == ["-m pip install -q torch==2.13.0+cpu", "-m pip install -q -e .[test]"], installs


def test_make_install_falls_back_to_the_pytorch_cpu_index(tmp_path):
    installs = _pip_installs(_make_install(tmp_path, None, first_pip_fails=True))
    assert installs == ["-m pip install -q torch==2.13.0+cpu",
                        "-m pip install -q torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu",
                        "-m pip install -q -e .[test]"], installs


@pytest.mark.parametrize("nvidia_smi", [None, "gpu"])
def test_make_install_keeps_a_torch_that_is_there(tmp_path, nvidia_smi):
    calls = _make_install(tmp_path, nvidia_smi, has_torch=True)
    assert _pip_installs(calls) == ["-m pip install -q -e .[test]"], calls
