"""The CLI end to end: Hydra sweeps (single and multirun), list, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMALL = ["methods=[reference,eager,sdpa_math,sdpa_cudnn]", "seq_lens=[32]", "cross_lens=[[8,32]]",
         "timing.budget_ms=2", "timing.min_reps=2", "timing.max_reps=3"]


def attnbench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "attnbench.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_smoke_sweep_writes_a_complete_run_folder(tmp_path):
    done = attnbench("sweep=smoke", f"results_dir={tmp_path}", "run_id=smoke", *SMALL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "smoke"
    frame = pd.read_parquet(run / "rows.parquet")
    # 4 methods x 2 masks x (self + cross) x 3 modes, and decode, where self and cross are one shape (1x32)
    assert len(frame) == 4 * 2 * 2 * 3 + 4 * 2 * 1
    assert frame.started_at.notna().all()
    assert set(frame.status) == {"ok", "unsupported"}
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["methods"] == ["reference", "eager", "sdpa_math", "sdpa_cudnn"] and config["seq_lens"] == [32]
    env = json.loads((run / "env.json").read_text())
    assert env["command"].startswith("attnbench sweep=smoke") and "run_id=smoke" in env["command"]
    assert "cases: ok" in done.stdout and "median ms per call" in done.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()  # no Hydra litter


def test_multirun_makes_one_run_per_job(tmp_path):
    done = attnbench("-m", "sweep=smoke", f"results_dir={tmp_path}", "dtype=float32,bfloat16",
                     "methods=[reference,sdpa_math]", "masks=[causal]", "modes=[fwd]", "seq_lens=[16]",
                     "cross_lens=[]", "timing.budget_ms=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted(p for p in tmp_path.iterdir() if (p / "rows.parquet").is_file())
    assert len(runs) == 2
    dtypes = {pd.read_parquet(r / "rows.parquet").dtype.iloc[0] for r in runs}
    assert dtypes == {"float32", "bfloat16"}


def test_bad_input_exits_2_naming_the_field(tmp_path):
    done = attnbench("sweep=smoke", f"results_dir={tmp_path}", "heads_q=8", "heads_kv=3", cwd=tmp_path)
    assert done.returncode == 2
    assert "'heads_kv'" in done.stderr and "does not divide" in done.stderr
    assert not any(tmp_path.iterdir())


def test_list_methods_shows_unavailable_with_why(tmp_path):
    done = attnbench("list", "methods", cwd=tmp_path)
    assert done.returncode == 0
    line = next(line for line in done.stdout.splitlines() if line.startswith("flash_attn "))
    assert " no " in line and "flash_attn" in line.split(" no ", 1)[1]
    assert any(line.startswith("sdpa_cudnn") for line in done.stdout.splitlines())


def test_sweep_presets_override_the_base_config_and_the_command_line_overrides_both():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        masks_cfg = compose(config_name="config", overrides=["sweep=masks"])
        assert masks_cfg.dense_mask_budget_mb == 8192  # the preset wins over conf/config.yaml
        assert masks_cfg.case_timeout_s == 300  # base values the preset leaves alone stay
        cli = compose(config_name="config", overrides=["sweep=masks", "dense_mask_budget_mb=64"])
        assert cli.dense_mask_budget_mb == 64


def test_method_and_mask_config_groups_select_what_runs():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from attnbench.config.plan import build_plan

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "sweep=smoke", "+method=materialized", "+mask=sliding_window", "mask.left=8", "device=cpu"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["methods"] == ["reference", "eager", "sdpa_math"]
    plan = build_plan(plain)
    assert {c.mask for c in plan.runnable} == {"sliding_window(left=8)"}
    assert {c.method for c in plan.runnable} == {"reference", "eager", "sdpa_math"}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")))
def test_every_sweep_preset_composes_and_plans(preset, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import attnbench.config.plan
    from attnbench.config.plan import build_plan

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="config", overrides=[f"sweep={preset}"]), resolve=True)
    monkeypatch.setattr(attnbench.config.plan, "resolve_devices", lambda cfg: ["cuda:0"])  # plan as on a GPU machine
    plan = build_plan(cfg)
    assert plan.runnable and plan.total == len({c.case_id for c in plan.runnable} |
                                               {c.case_id for c, _ in plan.unsupported})
    if preset == "decode":
        assert {c.mode for c in plan.runnable} == {"decode"} and {c.seq_q for c in plan.runnable} == {1}
        assert {(c.seq_kv, c.batch) for c in plan.runnable} == {(4096, 128), (16384, 32), (65536, 8), (262144, 2)}
