"""Provenance: every row says where and from which code it came; env.json and config.yaml cover every
invocation that wrote into a run."""
from __future__ import annotations

import json
import socket

import pandas as pd
import pytest
import yaml

from attnbench.config.plan import build_plan
from attnbench.execute import runner as runner
from attnbench.execute.runner import run_sweep
from attnbench.record import envinfo as envinfo
from attnbench.record import schema as schema
from attnbench.record.rundir import load_run, merge_configs


def _rows(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "rows.parquet")


@pytest.fixture
def fake_git(monkeypatch):
    """envinfo's git answers: set ``fake_git["sha"]`` / ``["dirty"]`` to what the next invocation sees."""
    state = {"sha": "a" * 40, "dirty": False}

    def git(*args):
        if args[0] == "rev-parse":
            return state["sha"]
        if args[0] == "status":
            return " M bench/x.py" if state["dirty"] else ""
        return None

    monkeypatch.setattr(envinfo, "_git", git)
    return state


@pytest.fixture
def fake_gpu(monkeypatch):
    """Workers report a GPU identity (a CPU run stands in for a GPU one)."""
    original = runner.Worker.start

    def start(self):
        ready = original(self)
        ready["identity"] = {"name": "Fake H200", "uuid": "bbbbbbbb-1111-1111-1111-111111111111",
                             "pci_bus_id": "00000000:3B:00.0", "nvml_index": 1, "nvml_match": "uuid"}
        return ready

    monkeypatch.setattr(runner.Worker, "start", start)


def test_every_row_carries_host_gpu_and_code(cfg, fake_git, fake_gpu):
    fake_git["dirty"] = True
    cfg.update(methods=["reference", "sdpa_cudnn"], masks=["full"])  # sdpa_cudnn: unsupported on the CPU
    frame = _rows(run_sweep(cfg, "test", show_progress=False))
    assert set(frame.status) == {"ok", "unsupported"}
    for column in ("host", "gpu_uuid", "gpu_pci_bus_id", "git_sha", "git_dirty", "invocation", "ms_samples"):
        assert column in schema.COLUMNS, column
    assert (frame.host == socket.gethostname()).all()
    assert (frame.git_sha == "a" * 40).all() and frame.git_dirty.all() and (frame.invocation == 0).all()
    ran = frame[frame.status == "ok"]
    assert (ran.gpu_uuid == "bbbbbbbb-1111-1111-1111-111111111111").all()
    assert (ran.gpu_pci_bus_id == "00000000:3B:00.0").all()
    assert frame[frame.status == "unsupported"].gpu_uuid.isna().all()  # planned out: never on a GPU


def test_a_resumed_run_keeps_each_invocation_and_a_config_covering_every_axis(cfg, fake_git):
    cfg.update(methods=["reference"], masks=["full"], seq_lens=[16])
    run_dir = run_sweep(cfg, "attnbench first", show_progress=False)
    fake_git["sha"], fake_git["dirty"] = "b" * 40, True
    cfg.update(seq_lens=[32], methods=["reference", "sdpa_math"])
    run_sweep(cfg, "attnbench second", show_progress=False)

    frame = _rows(run_dir)
    assert sorted(zip(frame.seq_q, frame.method)) == [(16, "reference"), (32, "reference"), (32, "sdpa_math")]
    first, second = frame[frame.seq_q == 16], frame[frame.seq_q == 32]
    assert (first.git_sha == "a" * 40).all() and (first.invocation == 0).all() and not first.git_dirty.any()
    assert (second.git_sha == "b" * 40).all() and (second.invocation == 1).all() and second.git_dirty.all()

    env = json.loads((run_dir / "env.json").read_text())
    entries = env["invocations"]
    assert [e["command"] for e in entries] == ["attnbench first", "attnbench second"]
    assert [e["git_sha"] for e in entries] == ["a" * 40, "b" * 40]
    assert [e["rows_written"] for e in entries] == [1, 2]
    assert all(e["finished_at"] and e["devices"]["cpu"]["name"] == "cpu" for e in entries)
    assert env["git_sha"] == "b" * 40 and env["mixed"]["git_sha"] == ["a" * 40, "b" * 40]
    assert env["started_at"] == entries[0]["started_at"] and env["finished_at"] == entries[1]["finished_at"]

    merged = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert merged["seq_lens"] == [16, 32] and merged["methods"] == ["reference", "sdpa_math"]
    assert yaml.safe_load((run_dir / "config.0.yaml").read_text())["seq_lens"] == [16]
    assert yaml.safe_load((run_dir / "config.1.yaml").read_text())["seq_lens"] == [32]
    planned = {case.case_id for case in build_plan(merged).runnable}
    assert set(frame.case_id) <= planned  # the merged view plans every case the rows hold
    assert not load_run(run_dir).warnings


def test_each_invocation_keeps_its_own_calibration(tmp_path, fake_git):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    index, _ = envinfo.begin_invocation(run_dir, "run", "first")
    envinfo.end_invocation(run_dir, index, rows_written=3, calibration={"matmul_bf16_tflops": 700.0})
    fake_git["sha"] = "b" * 40
    index, _ = envinfo.begin_invocation(run_dir, "run", "second")
    env = envinfo.end_invocation(run_dir, index, rows_written=2, calibration={"matmul_bf16_tflops": 650.0})
    assert [e["calibration"]["matmul_bf16_tflops"] for e in env["invocations"]] == [700.0, 650.0]
    assert [e["git_sha"] for e in env["invocations"]] == ["a" * 40, "b" * 40]
    assert env["calibration"]["matmul_bf16_tflops"] == 650.0 and env["git_sha"] == "b" * 40
    index, _ = envinfo.begin_invocation(run_dir, "run", "third: nothing left to run")
    env = envinfo.end_invocation(run_dir, index, rows_written=0)
    assert env["git_sha"] == "b" * 40 and env["calibration"]["matmul_bf16_tflops"] == 650.0
    assert env["invocations"][2]["rows_written"] == 0 and env["commands"][-1].startswith("third")


def test_an_older_env_json_becomes_the_first_invocations(tmp_path, fake_git):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    legacy = {"run_id": "old", "command": "attnbench one", "commands": ["attnbench one", "attnbench two"],
              "git_sha": "c" * 40, "host": "vm", "calibration": {"matmul_bf16_tflops": 1.0}}
    (run_dir / "env.json").write_text(json.dumps(legacy))
    index, _ = envinfo.begin_invocation(run_dir, "old", "attnbench three")
    env = envinfo.read_env(run_dir)
    assert index == 2 and [e["command"] for e in env["invocations"]] == ["attnbench one", "attnbench two",
                                                                         "attnbench three"]
    assert env["invocations"][0]["git_sha"] == "c" * 40 and "note" in env["invocations"][0]
    assert env["commands"] == ["attnbench one", "attnbench two", "attnbench three"]


def test_an_older_run_folder_keeps_its_configs_in_the_merge(tmp_path):
    from attnbench.record.rundir import write_config

    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "config.20260101-000000.yaml").write_text(yaml.safe_dump({"methods": ["a"], "seq_lens": [1]}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"methods": ["a", "b"], "seq_lens": [1]}))
    write_config(run_dir, {"methods": ["c"], "seq_lens": [2]}, 2)
    merged = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert merged == {"methods": ["a", "b", "c"], "seq_lens": [1, 2]}
    assert (run_dir / "config.legacy.yaml").is_file()
    write_config(run_dir, {"methods": ["a"], "seq_lens": [3]}, 3)  # the merged view is rebuilt, never merged into
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == {"methods": ["a", "b", "c"], "seq_lens": [1, 2, 3]}


def test_merge_configs_unions_axes_and_keeps_the_latest_of_other_keys():
    merged, notes = merge_configs({"seq_lens": [16], "seed": 0, "case_timeout_s": 240, "dtype": "float32"},
                                  {"seq_lens": [32, 16], "seed": 1, "case_timeout_s": 180, "dtype": "float32"})
    assert merged == {"seq_lens": [16, 32], "seed": [0, 1], "case_timeout_s": 180, "dtype": "float32"}
    assert any(note.startswith("case_timeout_s: 240 then 180") for note in notes)
    assert merge_configs({"masks": ["full"]}, {"masks": ["full"]}) == ({"masks": ["full"]}, [])
