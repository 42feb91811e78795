"""The train config key ``tf32``: full float32 matmuls unless a case asks for TF32 (CUDA), recorded in the row and in
the case id; a float32 method's own matmuls follow the same global setting, so the default must be full float32
(an H200 state sweep trained with TF32 silently: the rows said float32)."""
from __future__ import annotations

import json

import pytest
import torch

from attnbench.config.plan import ConfigError
from attnbench.execute.train import TrainCase, build_train_plan, run_train
from attnbench.record.quality import load_quality
from attnbench.tasks import train as task_train

TINY = {"d_model": 16, "heads": 2, "layers": 1, "batch": 4, "eval_batches": 1, "warmup": 1, "steps": 2, "vocab": 64,
        "kv_pairs": 2, "seq_lens": [16]}


def _cfg(tmp_path, **extra):
    cfg = {"tasks": ["mqar"], "methods": ["sdpa_math"], "seeds": [0], "dtype": "float32", "device": "cpu",
           "results_dir": str(tmp_path), "run_id": "tf32", "case_timeout_s": 120, "task_options": {"mqar": TINY}}
    cfg.update(extra)
    return cfg


def test_tf32_only_on_cuda_and_only_when_asked():
    assert task_train.matmul_precision(True, "cuda") == "high"
    assert task_train.matmul_precision(False, "cuda") == "highest"
    assert task_train.matmul_precision(True, "cpu") == "highest"


@pytest.mark.parametrize("bad", ["yes", 1, [True]])
def test_a_bad_tf32_names_the_field(tmp_path, bad):
    with pytest.raises(ConfigError, match="tf32"):
        build_train_plan(_cfg(tmp_path, tf32=bad))


def test_tf32_enters_the_case_id_only_when_set(tmp_path):
    plain = build_train_plan(_cfg(tmp_path)).runnable[0]
    asked = build_train_plan(_cfg(tmp_path, tf32=True)).runnable[0]
    assert (plain.tf32, asked.tf32) == (False, True)
    assert plain.case_id != asked.case_id
    # a full-float32 case keeps the id it had before the key existed (committed runs resume)
    old_key = json.dumps([plain.task, plain.method, plain.seq, plain.seed, plain.dtype, plain.params_json])
    import hashlib
    assert plain.case_id == hashlib.sha1(old_key.encode()).hexdigest()[:16]


def test_the_case_tf32_reaches_the_training_and_the_row(tmp_path, monkeypatch):
    seen = []
    real = torch.set_float32_matmul_precision

    def spy(value):
        seen.append(value)
        real(value)

    monkeypatch.setattr(torch, "set_float32_matmul_precision", spy)
    captured = []
    original = task_train.train_task

    def record(*args, **kwargs):
        captured.append(dict(kwargs.get("options") or {}))
        return original(*args, **kwargs)

    monkeypatch.setattr(task_train, "train_task", record)
    run_dir = run_train(_cfg(tmp_path, tf32=True), "test", show_progress=False)
    rows = load_quality(run_dir)
    assert list(rows["tf32"]) == [True] and list(rows["status"]) == ["ok"]
    assert captured and captured[0]["tf32"] is True
    assert seen[0] == "highest"  # on the CPU TF32 is never switched on, asked or not
    case = TrainCase("mqar", "sdpa_math", 16, 0, "float32", "{}")
    assert case.tf32 is False  # the default: full float32


@pytest.mark.parametrize("tf32", [True, False])
def test_experiments_run_inside_the_case_precision(tmp_path, monkeypatch, tf32):
    """An experiment (here rf_attention_probe) fits its own models: the case's precision must hold inside it too.
    On the CPU TF32 is never on, so ``matmul_precision`` is made to answer as on CUDA; a run_case that set the
    precision only for trained cases (the fifth session's) fails the tf32=True case."""
    from attnbench.tasks import TASKS

    monkeypatch.setattr(task_train, "matmul_precision", lambda asked, device_type: "high" if asked else "highest")
    cls = TASKS["rf_attention_probe"].cls
    seen = []
    original = cls.probe

    def spy(self, *args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "probe", spy)
    small = {"seq_lens": [4], "features": 8, "samples": [16], "test": 16, "batch": 16}
    cfg = _cfg(tmp_path, tf32=tf32, tasks=["rf_attention_probe"], task_options={"rf_attention_probe": small})
    before = torch.get_float32_matmul_precision()
    run_dir = run_train(cfg, "test", show_progress=False)
    assert seen == ["high" if tf32 else "highest"]
    assert torch.get_float32_matmul_precision() == before  # restored after the case
    rows = load_quality(run_dir)
    assert list(rows["tf32"]) == [tf32] and list(rows["status"]) == ["ok"], list(rows["reason"])
