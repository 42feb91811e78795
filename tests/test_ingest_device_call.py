"""scripts/ingest_device_call.py: a device call's packed run folders folded into the results folder as
`attnbench merge` does (a resumed copy: only its new rows move), a new run copied, each step log filed under the
runs it names, consoles under every run; a device run that re-measured a committed case is refused (negative
control), and nothing is written on a dry run."""
from __future__ import annotations

import copy
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from attnbench.execute.runner import run_sweep
from conftest import BASE
from scriptload import load_script


def _module():
    return load_script("ingest_device_call")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]


def _sweep(results: Path, run_id: str, seq_lens, methods=("reference",)):
    config = copy.deepcopy(BASE)
    config.update(results_dir=str(results), run_id=run_id, seq_lens=list(seq_lens), methods=list(methods),
                  masks=["full"])
    return run_sweep(config, "test", show_progress=False)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The run folders these tests start from, each swept once for the module (a sweep starts a worker process,
    ~2 s): "kept" (reference at 16 tokens), "kept-resumed" (a copy of it resumed at 16 and 24: its later rows,
    one shared history), "kept-again" (the same case swept again from nothing: no shared history), "new" and
    "new-b" (16 tokens). Tests copy them (``_place``) and never change these."""
    root = tmp_path_factory.mktemp("swept")
    runs = {"kept": _sweep(root / "kept", "kept", [16])}
    shutil.copytree(runs["kept"], root / "kept-resumed" / "kept")
    runs["kept-resumed"] = _sweep(root / "kept-resumed", "kept", [16, 24])
    runs["kept-again"] = _sweep(root / "kept-again", "kept", [16])
    runs["new"] = _sweep(root / "new", "new", [16])
    runs["new-b"] = _sweep(root / "new-b", "new-b", [16])
    return runs


def _place(swept, name: str, into: Path) -> Path:
    """A copy of the swept run ``name`` in the results folder ``into``, under its run id."""
    run = swept[name]
    return Path(shutil.copytree(run, into / run.name))


def _pack(tmp_path: Path, device_out: Path, name: str = "call") -> Path:
    files_at = tmp_path / "files_at"
    files_at.mkdir()
    with tarfile.open(files_at / f"{name}.tgz", "w:gz") as tar:
        for item in device_out.iterdir():
            tar.add(item, arcname=item.name)
    (files_at / f"{name}-console.txt").write_text("== step: exit 0\n")
    return files_at


def test_a_resumed_copy_merges_a_new_run_copies_and_logs_are_filed(swept, tmp_path):
    module = _module()
    results = tmp_path / "results"
    _place(swept, "kept", results)
    committed = len(_rows(results / "kept"))
    device_out = tmp_path / "device"
    _place(swept, "kept-resumed", device_out)  # the device call resumed a copy of the committed run
    _place(swept, "new", device_out)
    (device_out / "step-a.txt").write_text(f"run folder: /tmp/out-x/kept\ncases: ok 1\n")
    files_at = _pack(tmp_path, device_out)

    dry = module.ingest(files_at, "s99", results, tmp_path / "scratch-dry", report=False, dry_run=True,
                        refresh_cache=False)
    assert dry["runs"]["kept"]["action"] == "merge" and dry["runs"]["new"]["action"] == "copy"
    assert not (results / "new").exists() and len(_rows(results / "kept")) == committed  # nothing written

    plan = module.ingest(files_at, "s99", results, tmp_path / "scratch", report=False, refresh_cache=False)
    kept = _rows(results / "kept")
    assert len(kept) == len(_rows(device_out / "kept")) > committed  # the device call's new rows, once each
    assert len({r["case_id"] for r in kept}) == len(kept)
    assert (results / "new" / "rows.jsonl").is_file()
    logs = results / "kept" / "device-logs" / "s99"
    assert (logs / "step-a.txt").is_file() and (logs / "call-console.txt").is_file()
    new_logs = results / "new" / "device-logs" / "s99"
    assert (new_logs / "call-console.txt").is_file() and not (new_logs / "step-a.txt").exists()
    assert plan["runs"]["kept"]["after"]["ok"] == len(kept)


def test_a_device_run_that_remeasured_a_committed_case_is_refused(swept, tmp_path):
    """Negative control: a device run started from nothing (no shared history) measured the committed case again:
    `attnbench merge` refuses it and the script stops, naming the runs, with the committed rows untouched."""
    module = _module()
    results = tmp_path / "results"
    _place(swept, "kept", results)
    before = (results / "kept" / "rows.jsonl").read_text()
    device_out = tmp_path / "device"
    _place(swept, "kept-again", device_out)
    files_at = _pack(tmp_path, device_out)
    with pytest.raises(SystemExit, match="attnbench merge"):
        module.ingest(files_at, "s99", results, tmp_path / "scratch", report=False, refresh_cache=False)
    assert (results / "kept" / "rows.jsonl").read_text() == before


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    module = _module()
    with pytest.raises(SystemExit, match="FILES_AT"):
        module.ingest(tmp_path / "missing", "s99", tmp_path, tmp_path / "scratch")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="--tag"):
        module.ingest(tmp_path / "empty", "../x", tmp_path, tmp_path / "scratch")
    with pytest.raises(SystemExit, match="no archive"):
        module.ingest(tmp_path / "empty", "s99", tmp_path, tmp_path / "scratch")


def test_a_step_cut_before_its_summary_is_filed_by_the_run_it_names(swept, tmp_path):
    module = _module()
    results = tmp_path / "results"
    device_out = tmp_path / "device"
    _place(swept, "new", device_out)
    _place(swept, "new-b", device_out)
    (device_out / "step.txt").write_text("new:  50%|##   | 1/2 [00:10<00:10]\nattnbench: interrupted by SIGTERM\n")
    files_at = _pack(tmp_path, device_out)
    plan = module.ingest(files_at, "s99", results, tmp_path / "scratch", report=False, dry_run=True,
                         refresh_cache=False)
    assert any(log.endswith("step.txt") for log in plan["logs"]["new"])
    assert not any(log.endswith("step.txt") for log in plan["logs"]["new-b"])  # a longer name is not a match


def test_gpu_tests_follow_their_step_and_an_unchanged_run_is_left_alone(swept, tmp_path):
    """A step's GPU tests (gpu-tests-STEP.txt) are filed where STEP.txt went, not under every run; a committed run
    the call copied out and returned as it was is neither merged nor given logs (listed as unchanged). Control: a
    test log of no step still goes to every run the call changed."""
    module = _module()
    results = tmp_path / "results"
    device_out = tmp_path / "device"
    _place(swept, "kept", device_out)  # copied out by the device script, not touched ...
    _place(swept, "kept-resumed", results)  # ... while an earlier call's ingest gave the committed run more rows
    assert len(_rows(results / "kept")) > len(_rows(device_out / "kept"))
    _place(swept, "new", device_out)
    _place(swept, "new-b", device_out)
    (device_out / "step-a.txt").write_text("run folder: /tmp/out-x/new\ncases: ok 1\n")
    (device_out / "gpu-tests-step-a.txt").write_text("3 passed\n")
    (device_out / "gpu-tests-other.txt").write_text("1 passed\n")
    files_at = _pack(tmp_path, device_out)
    plan = module.ingest(files_at, "s99", results, tmp_path / "scratch", report=False, refresh_cache=False)
    assert plan["unchanged"] == ["kept"] and "kept" not in plan["runs"]
    assert not (results / "kept" / "device-logs").exists()
    logs_a, logs_b = (results / name / "device-logs" / "s99" for name in ("new", "new-b"))
    assert (logs_a / "gpu-tests-step-a.txt").is_file() and not (logs_b / "gpu-tests-step-a.txt").exists()
    assert (logs_a / "gpu-tests-other.txt").is_file() and (logs_b / "gpu-tests-other.txt").is_file()
