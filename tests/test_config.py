"""The config schema: every key typed and listed, unknown keys refused, bad run_id / results_dir refused
before anything is written, and the keys the code reads accepted."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnbench.config.plan import ConfigError, build_plan
from attnbench.config.schema import FIELDS, SECTIONS, validate_config
from attnbench.execute.runner import run_sweep, worker_options
from conftest import BASE

REPO = Path(__file__).resolve().parents[1]


def _cfg(**changes):
    cfg = copy.deepcopy(BASE)
    cfg.update(changes)
    return cfg


def _dotted_keys(mapping: dict) -> set[str]:
    keys = set()
    for key, value in mapping.items():
        if key in ("defaults", "hydra"):
            continue
        if key in SECTIONS and isinstance(value, dict):
            keys |= {f"{key}.{sub}" for sub in value}
        else:
            keys.add(key)
    return keys


@pytest.mark.parametrize("name", ["config.yaml", *sorted(f"sweep/{p.name}" for p in (REPO / "conf" / "sweep").glob("*.yaml"))])
def test_the_schema_lists_every_key_of_the_config_and_the_presets(name):
    keys = _dotted_keys(yaml.safe_load((REPO / "conf" / name).read_text()))
    assert keys and keys <= set(FIELDS), sorted(keys - set(FIELDS))


def _set(cfg: dict, path: str, value) -> dict:
    node = cfg
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return cfg


@pytest.mark.parametrize("path", sorted(FIELDS))
def test_every_field_is_type_checked_and_named_by_its_dotted_path(path):
    cfg = _set(_cfg(), path, object())
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert info.value.field == path or info.value.field.startswith(path), str(info.value)
    validate_config(_set({}, path, FIELDS[path].default))  # its default passes


def test_energy_window_ms_is_accepted_and_reaches_the_worker():
    cfg = _cfg(timing={**BASE["timing"], "energy_window_ms": 120})
    build_plan(cfg)
    assert worker_options(cfg)["energy_window_ms"] == 120.0
    assert worker_options(_cfg())["energy_window_ms"] == 250.0


def test_method_options_are_checked_and_reach_the_worker():
    cfg = _cfg(method_options={"linear_attn": {"chunk": 8}})
    build_plan(cfg)
    assert worker_options(cfg)["method_options"] == {"linear_attn": {"chunk": 8}}
    assert worker_options(_cfg())["method_options"] == {}
    with pytest.raises(ConfigError, match=r"method_options\.sdpa_math\.scale.*takes no options"):
        build_plan(_cfg(method_options={"sdpa_math": {"scale": 0.5}}))  # sdpa_math reads no options


def test_a_cross_only_sweep_plans_only_its_pairs():
    plan = build_plan(_cfg(seq_lens=[], cross_lens=[[8, 32]]))
    assert plan.runnable and {(c.seq_q, c.seq_kv) for c in plan.runnable} == {(8, 32)}


def test_tokens_below_a_length_runs_batch_1_and_says_so():
    plan = build_plan(_cfg(batch=None, tokens=64, seq_lens=[16, 128], methods=["reference"], masks=["full"]))
    batches = {c.seq_q: c.batch for c in plan.runnable}
    assert batches == {16: 4, 128: 1}
    assert len(plan.notes) == 1 and "tokens=64" in plan.notes[0] and "128" in plan.notes[0]
    assert "16," not in plan.notes[0] and not build_plan(_cfg(batch=None, tokens=512)).notes


def test_a_numeric_run_id_from_the_command_line_is_a_folder_name():
    assert validate_config(_cfg(run_id=20250101))["run_id"] == "20250101"


@pytest.mark.parametrize("run_id", ["../../escape", "ABSOLUTE", "a/b"])
def test_run_id_cannot_leave_or_nest_in_results_dir(tmp_path, run_id):
    root = tmp_path / "deep" / "er"
    root.mkdir(parents=True)
    run_id = str(tmp_path / "abs") if run_id == "ABSOLUTE" else run_id
    with pytest.raises(ConfigError) as info:
        run_sweep(_cfg(results_dir=str(root / "results"), run_id=run_id), "test", show_progress=False)
    assert info.value.field == "run_id"
    written = [p for p in tmp_path.rglob("*") if p not in (root, root.parent)]
    assert not written, written


def test_results_dir_that_is_a_file_is_refused_naming_it(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for results_dir in (afile, afile / "below"):
        with pytest.raises(ConfigError) as info:
            run_sweep(_cfg(results_dir=str(results_dir), run_id="x"), "test", show_progress=False)
        assert info.value.field == "results_dir" and "not a folder" in str(info.value)
    assert afile.read_text() == "not a folder"


def test_an_unwritable_results_dir_is_refused_naming_it(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a permission bit forbids; /proc refuses new folders to all
        results_dir = Path("/proc/attnbench-test-results")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        results_dir = locked / "results"
    with pytest.raises(ConfigError) as info:
        run_sweep(_cfg(results_dir=str(results_dir), run_id="x"), "test", show_progress=False)
    assert info.value.field == "results_dir" and str(results_dir) in str(info.value)
    assert not results_dir.exists()


def _attnbench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "attnbench.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("override, field", [("+foo=1", "'foo'"), ("flex_block_size=abc", "'flex_block_size'"),
                                             ("run_id=../escape", "'run_id'")])
def test_cli_refuses_bad_keys_before_writing_anything(tmp_path, override, field):
    done = _attnbench("sweep=smoke", f"results_dir={tmp_path / 'results'}", "device=cpu", override, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert field in done.stderr and "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())
