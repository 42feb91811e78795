"""A backend's declining error (``Capabilities.declines``, e.g. fla refusing its gated backward on Hopper with
Triton < 3.7.1) makes a training case ``unsupported`` with the backend's words, as it does a timed case: the
H200 task grid recorded those cases as ``error`` before (results/h200-task-grid, fla_simple_gla)."""
from __future__ import annotations

import dataclasses

import pytest

from attnbench.execute.train import build_train_plan, run_case
from attnbench.methods import METHODS
from attnbench.methods.registry import Capabilities, MethodSpec
from attnbench.tasks import train as task_train

REFUSAL = "Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results for gated chunk_bwd_dqkwg (see #640)."
TINY = {"d_model": 16, "heads": 2, "layers": 1, "batch": 4, "eval_batches": 1, "warmup": 1, "steps": 2, "vocab": 64,
        "kv_pairs": 2}


@pytest.fixture
def declining(monkeypatch):
    base = METHODS["sdpa_math"]
    caps = Capabilities(**{**base.caps.__dict__, "masks": set(base.caps.masks),
                           "declines": ("produces incorrect results",)})
    monkeypatch.setitem(METHODS, "t_declining", MethodSpec("t_declining", base.build, caps))

    def raise_(message):
        def train(*args, **kwargs):
            raise RuntimeError(message + "\nPlease upgrade Triton")
        monkeypatch.setattr(task_train, "train_task", train)

    return raise_


def _run(method, tmp_path):
    cfg = {"tasks": ["mqar"], "methods": ["sdpa_math"], "seeds": [0], "dtype": "float32", "device": "cpu",
           "results_dir": str(tmp_path), "run_id": "declines", "task_options": {"mqar": {**TINY, "seq_lens": [16]}}}
    case = dataclasses.replace(build_train_plan(cfg).runnable[0], method=method)
    return run_case(case, "cpu", {}, {}, timeout_s=60)


def test_a_declining_error_in_training_is_unsupported_with_the_backends_words(declining, tmp_path):
    declining(REFUSAL)
    row = _run("t_declining", tmp_path)
    assert row["status"] == "unsupported"
    assert row["reason"] == REFUSAL  # the first line, not "RuntimeError during training: ..."


def test_other_errors_stay_errors(declining, tmp_path):
    declining("an ordinary bug")  # negative control: not one of the method's declines
    row = _run("t_declining", tmp_path)
    assert row["status"] == "error" and "an ordinary bug" in row["reason"]


def test_a_method_without_declines_keeps_the_error(declining, tmp_path):
    declining(REFUSAL)
    row = _run("sdpa_math", tmp_path)  # the same words from a method that declares no declines: a real error
    assert row["status"] == "error"


def test_capabilities_declined():
    caps = Capabilities(declines=("No available kernel",))
    assert caps.declined(RuntimeError("No available kernel. Aborting\nmore")) == "No available kernel. Aborting"
    assert caps.declined(RuntimeError("something else")) is None
    assert Capabilities().declined(RuntimeError("No available kernel")) is None
