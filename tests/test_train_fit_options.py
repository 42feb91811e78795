"""``fit_method_options``: a method's size options whose defaults do not fit a train case's length are fitted by
the train planner (attnbench.methods.fitting), visibly (case id, the row's ``fitted_options``); an option the
config sets is never fitted, and gives the method's own unsupported reason when it does not fit."""
from __future__ import annotations

import json

import pytest

from attnbench.config.plan import ConfigError
from attnbench.execute import train
from attnbench.execute.train import build_train_plan
from attnbench.methods.sparse import common

TINY = dict(d_model=16, heads=2, layers=1, batch=2, steps=1, eval_batches=1, warmup=1, vocab=256, kv_pairs=2)
SIZED = ["biformer", "long_short", "halo"]  # defaults 256: longer than the 128-token task


def config(fit: bool, method_options: dict | None = None, methods=(*SIZED, "sdpa_math")) -> dict:
    return {"tasks": ["mqar"], "methods": list(methods), "seeds": [0], "dtype": "float32", "device": "cpu",
            "fit_method_options": fit, "method_options": method_options or {},
            "task_options": {"mqar": {**TINY, "seq_lens": [128]}}}


def cases(cfg: dict) -> dict:
    plan = build_train_plan(cfg, target_device="cpu", check_availability=False)
    assert not plan.unsupported, plan.unsupported
    return {case.method: case for case in plan.runnable}


def test_sized_methods_at_128_tokens_are_planned_with_fitted_options_and_new_ids():
    fitted, plain = cases(config(True)), cases(config(False))
    for method in SIZED:
        options = json.loads(fitted[method].fitted_json)
        assert options and fitted[method].case_id != plain[method].case_id  # another case: another id
        assert plain[method].fitted_json == ""
    assert json.loads(fitted["halo"].fitted_json) == {"block": 32, "halo": 16}  # 4 blocks of the 128 tokens
    assert json.loads(fitted["long_short"].fitted_json) == {"window": 32, "rank": 16}
    region = json.loads(fitted["biformer"].fitted_json)["region"]
    assert 128 % region == 0 and 128 // region >= 2 * 4  # at least 2 x topk key regions
    # a method whose defaults fit keeps its case and id
    assert fitted["sdpa_math"].fitted_json == "" and fitted["sdpa_math"].case_id == plain["sdpa_math"].case_id


@pytest.mark.parametrize("method", SIZED)
def test_a_fitted_case_runs_and_its_row_shows_the_options(monkeypatch, method):
    monkeypatch.setattr(common, "ATTEND", common.dense_attend)  # no compiled FlexAttention on the CPU
    case = cases(config(True, methods=[method]))[method]
    measured = train._worker_case(case, "cpu", {"method_options": {}}, timeout_s=60)
    assert measured["status"] == "ok", measured["reason"]
    row = train._describe(case, "run", "cpu")
    assert json.loads(row["fitted_options"]) == case.fitted
    # control: the same case with the defaults is the unsupported row the H200 grid had
    plain = cases(config(False, methods=[method]))[method]
    measured = train._worker_case(plain, "cpu", {"method_options": {}}, timeout_s=60)
    assert measured["status"] == "unsupported" and f"method_options.{method}." in measured["reason"]
    assert train._describe(plain, "run", "cpu")["fitted_options"] is None


def test_an_option_the_config_sets_is_never_fitted_and_keeps_its_unsupported_reason():
    set_options = {"biformer": {"region": 256}, "halo": {"block": 256}, "long_short": {"window": 256}}
    planned = cases(config(True, set_options))
    for method in SIZED:
        assert planned[method].fitted_json == "", planned[method].fitted_json
        options = {"method_options": set_options}
        measured = train._worker_case(planned[method], "cpu", options, timeout_s=60)
        assert measured["status"] == "unsupported"
        assert f"method_options.{method}." in measured["reason"] and "got 256" in measured["reason"]
    # one field set, the other fitted around it: long_short's window set to 32, its causal rank (64) fitted
    planned = cases(config(True, {"long_short": {"window": 32}}, methods=["long_short"]))
    assert json.loads(planned["long_short"].fitted_json) == {"rank": 16}


def test_fit_method_options_must_be_a_boolean():
    with pytest.raises(ConfigError, match="fit_method_options"):
        build_train_plan(config("yes"), target_device="cpu", check_availability=False)
