"""Task registry, generators, the host model's wiring, the trainer's statuses and `attnbench train`."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from attnbench.config.plan import ConfigError
from attnbench.config.plugins import load_plugins
from attnbench.execute.train import build_train_plan, run_train
from attnbench.record.quality import QUALITY_COLUMNS, STATUSES, load_quality
from attnbench.tasks import IGNORE, TASKS, Task, TaskParamError, register_task, task_params
from attnbench.tasks.model import build_model
from attnbench.tasks.train import attention_case, train_task

PLUGIN = str(Path(__file__).resolve().parent / "plugins" / "control_methods.py")
load_plugins([PLUGIN])
CONTROL = __import__("sys").modules["attnbench_plugin_control_methods"]
CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = dict(d_model=16, heads=2, layers=1, batch=4, steps=3, eval_batches=1, warmup=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def make(name, seq=None, **overrides):
    params = task_params(name, overrides)
    return TASKS[name].make(params, seq or params["seq_lens"][0])


# ---- registry and config ---------------------------------------------------------------------------------------
def test_every_pattern_has_at_least_two_trained_tasks():
    by_pattern = {}
    for spec in TASKS.values():
        if spec.cls.kind == "train":
            by_pattern.setdefault(spec.pattern, []).append(spec.name)
    assert {p: len(v) >= 2 for p, v in by_pattern.items()} == {p: True for p in
                                                                 ("causal_self", "noncausal_self", "noncausal_cross",
                                                                  "causal_cross")}


def test_conf_task_files_equal_the_code_defaults():
    """conf/task/<name>.yaml is what `attnbench train` loads: it must say what the code's defaults say."""
    for name, spec in TASKS.items():
        if spec.module.startswith("attnbench.tasks"):
            loaded = yaml.safe_load((CONF / "task" / f"{name}.yaml").read_text())
            assert loaded == dict(spec.cls.defaults), name
    train = (CONF / "train.yaml").read_text()
    for name, spec in TASKS.items():
        if spec.module.startswith("attnbench.tasks"):
            assert f"task@task_options.{name}: {name}" in train


def test_register_task_rejects_bad_declarations():
    with pytest.raises(TypeError):
        register_task("t_not_a_task")(object)

    class BadPattern(Task):
        pattern = "sideways"

    with pytest.raises(ValueError, match="pattern"):
        register_task("t_bad_pattern")(BadPattern)


def test_parameters_are_checked_with_their_names():
    with pytest.raises(TaskParamError, match=r"task_options\.mqar\.bogus"):
        task_params("mqar", {"bogus": 1})
    with pytest.raises(TaskParamError, match=r"task_options\.mqar\.kv_pairs"):
        make("mqar", seq=16, kv_pairs=8, vocab=64)
    with pytest.raises(TaskParamError, match=r"task_options\.digits\.seq_lens"):
        if TASKS["digits"].availability()[0]:
            make("digits", seq=100)
        else:
            raise TaskParamError("task_options.digits.seq_lens (sklearn missing)")


# ---- generators ------------------------------------------------------------------------------------------------
def test_mqar_queries_ask_for_the_value_bound_to_their_key():
    task = make("mqar", seq=64, vocab=256, kv_pairs=8)
    batch = task.sample(16, torch.Generator().manual_seed(0), "train")
    for inputs, targets in zip(batch.inputs, batch.targets):
        pairs = {int(inputs[2 * i]): int(inputs[2 * i + 1]) for i in range(8)}
        asked = (targets != IGNORE).nonzero().flatten()
        assert len(asked) == 8
        for pos in asked.tolist():
            assert pos >= 16 and int(targets[pos]) == pairs[int(inputs[pos])]


def test_generators_are_seeded_and_train_and_eval_differ():
    for name in ("mqar", "niah", "selective_copy", "sort", "lookup", "delayed_copy", "listops"):
        task = make(name)
        a = task.sample(8, torch.Generator().manual_seed(3), "train")
        b = task.sample(8, torch.Generator().manual_seed(3), "train")
        c = task.sample(8, torch.Generator().manual_seed(4), "train")
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets), name
        assert not torch.equal(a.inputs, c.inputs), name


def test_mqar_train_and_eval_sets_do_not_overlap():
    """Zoology's check: test sequences that also occur in training (here: 0 of 512 against 5,120)."""
    task = make("mqar", seq=64, vocab=8192, kv_pairs=8)
    train = {tuple(r.tolist()) for _ in range(10) for r in task.sample(512, torch.Generator().manual_seed(_), "train").inputs}
    evaluation = [tuple(r.tolist()) for r in task.sample(512, torch.Generator().manual_seed(99), "eval").inputs]
    assert sum(r in train for r in evaluation) == 0


def test_niah_answer_is_the_needle_value_at_every_depth():
    task = make("niah", seq=48, depths=5)
    batch = task.sample(10, torch.Generator().manual_seed(0), "eval")
    assert batch.groups.tolist() == [0, 1, 2, 3, 4] * 2
    for inputs, targets, depth in zip(batch.inputs, batch.targets, batch.groups):
        needle = (inputs == task.NEEDLE).nonzero().flatten()
        assert len(needle) == 1
        start = int(needle[0]) + 1 + task.key_len + 1
        value = inputs[start:start + task.value_len]
        assert targets[targets != IGNORE].tolist() == value.tolist()
        expected = round(int(depth) / 4 * task.haystack) + 1  # after BOS and the haystack before it
        assert int(needle[0]) == expected


def test_selective_copy_targets_are_the_data_tokens_in_order():
    task = make("selective_copy", seq=32, tokens=4, alphabet=10)
    batch = task.sample(8, torch.Generator().manual_seed(0), "train")
    for inputs, targets in zip(batch.inputs, batch.targets):
        data = inputs[:28][inputs[:28] > 0]
        assert data.tolist() == targets[28:].tolist() and (inputs[28:] == 9).all()


def test_streaming_targets_come_from_the_visible_prefix_only():
    """Causal cross: decoder step t sees source positions <= t + lead; its target must be among them."""
    for name, extra in (("delayed_copy", {}), ("chunk_reverse", {"chunk": 4, "lead": 4})):
        task = make(name, seq=32, **extra)
        index = task.source_index()
        assert (index <= torch.arange(task.seq_q) + task.lead).all(), name
        assert (index >= 0).all() and len(set(index.tolist())) == len(index), name
        batch = task.sample(4, torch.Generator().manual_seed(0), "train")
        assert torch.equal(batch.targets, batch.inputs[:, index])


def test_sort_targets_are_the_smallest_values_ascending():
    task = make("sort", seq=16)
    batch = task.sample(8, torch.Generator().manual_seed(0), "train")
    assert task.seq_q == 8 and task.seq_kv == 16
    assert torch.equal(batch.targets, batch.inputs.sort(1).values[:, :8])
    assert torch.equal(batch.decoder_inputs[:, 1:], batch.targets[:, :-1])


def test_listops_labels_are_the_expression_values():
    from attnbench.tasks.encoder import CLOSE, DIGIT0, OP0

    task = make("listops", seq=64, max_depth=4, max_args=4)
    batch = task.sample(16, torch.Generator().manual_seed(0), "train")

    def evaluate(tokens):
        stack = []
        for t in tokens:
            if t >= OP0 and t < CLOSE:
                stack.append([t - OP0])
            elif t == CLOSE:
                op, *vals = stack.pop()
                value = [min(vals), max(vals), int(sorted(vals)[len(vals) // 2]) if len(vals) % 2 else
                         int((sorted(vals)[len(vals) // 2 - 1] + sorted(vals)[len(vals) // 2]) / 2), sum(vals) % 10][op]
                if not stack:
                    return value
                stack[-1].append(value)
            elif DIGIT0 <= t < DIGIT0 + 10:
                stack[-1].append(t - DIGIT0)
        raise AssertionError("unbalanced")

    for inputs, target in zip(batch.inputs, batch.targets):
        tokens = [t for t in inputs.tolist()[1:] if t != 0]
        assert evaluate(tokens) == int(target)


# ---- the model's wiring ----------------------------------------------------------------------------------------
def _model(name, method="sdpa_math", seq=None, **overrides):
    task = make(name, seq=seq, **{**TINY, **overrides})
    case = attention_case(task, method, 4, "float32", 0, "cpu")
    torch.manual_seed(0)
    return task, build_model(task, case, torch.device("cpu"), {}, {})


def test_causal_self_model_does_not_see_future_tokens():
    task, model = _model("mqar", seq=32, vocab=64, kv_pairs=4)
    batch = task.sample(4, torch.Generator().manual_seed(0), "train")
    out = model(batch)
    changed = batch.inputs.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 64
    out2 = model(type(batch)(changed, batch.targets))
    assert torch.allclose(out[:, :20], out2[:, :20], atol=1e-5)
    assert not torch.allclose(out[:, 20:], out2[:, 20:], atol=1e-3)


def test_causal_cross_decoder_step_reads_only_the_source_prefix():
    task, model = _model("delayed_copy", seq=32, lead=4, delay=2)
    batch = task.sample(4, torch.Generator().manual_seed(0), "train")
    out = model(batch)
    changed = batch.inputs.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 16  # step t sees source <= t + 4: steps 0..15 must not move
    out2 = model(type(batch)(changed, batch.targets, batch.decoder_inputs))
    assert torch.allclose(out[:, :16], out2[:, :16], atol=1e-5)
    assert not torch.allclose(out[:, 16:], out2[:, 16:], atol=1e-3)


def test_the_method_contract_is_served_in_training():
    """Prepared.parameters are trained, extras are drawn and prepare runs on every forward."""
    CONTROL.CALLS["prepare"] = 0
    params = task_params("mqar", {**TINY, "vocab": 64, "kv_pairs": 2, "steps": 5, "lr": 0.1})
    outcome = train_task("mqar", params, 16, "q_contract", seed=0)
    assert outcome.status == "ok"
    layers, forwards = 1, 5 + 1  # steps, then one evaluation batch
    assert CONTROL.CALLS["prepare"] == layers * forwards
    assert float(CONTROL.CALLS["temperature"].detach()) != 0.0  # moved by the optimiser


def test_a_layer_form_method_is_the_mixer_itself():
    params = task_params("mqar", {**TINY, "vocab": 64, "kv_pairs": 2})
    outcome = train_task("mqar", params, 16, "q_layer_mean", seed=0)
    assert outcome.status == "ok" and outcome.parameters > 0


# ---- statuses --------------------------------------------------------------------------------------------------
def test_nan_loss_is_diverged_with_the_step():
    params = task_params("mqar", {**TINY, "vocab": 64, "kv_pairs": 2})
    outcome = train_task("mqar", params, 16, "q_nan", seed=0)
    assert outcome.status == "diverged" and "step 0" in outcome.reason and outcome.value is None


def test_training_past_its_budget_is_timeout():
    params = task_params("mqar", {**TINY, "vocab": 64, "kv_pairs": 2, "steps": 1000})
    outcome = train_task("mqar", params, 16, "sdpa_math", seed=0, max_wall_s=0.0)
    assert outcome.status == "timeout" and "after 1 of 1000 steps" in outcome.reason and outcome.value is None


def _cfg(tmp_path, **extra):
    cfg = {"tasks": ["mqar"], "methods": ["sdpa_math"], "seeds": [0], "dtype": "float32", "device": "cpu",
           "results_dir": str(tmp_path), "run_id": "q", "plugins": [PLUGIN], "case_timeout_s": 60,
           "task_options": {"mqar": {**TINY, "vocab": 64, "kv_pairs": 2, "seq_lens": [16]},
                            "sort": {**TINY, "seq_lens": [8]}}}
    cfg.update(extra)
    return cfg


def test_train_run_writes_a_row_for_every_case_whatever_happened(tmp_path):
    cfg = _cfg(tmp_path, tasks=["mqar", "sort"],
               methods=["sdpa_math", "q_nan", "q_oom", "q_refuses", "q_layer_mean", "sdpa_efficient"])
    run_dir = run_train(cfg, "test", show_progress=False)
    frame = load_quality(run_dir)
    assert list(frame.columns[:len(QUALITY_COLUMNS)]) == list(QUALITY_COLUMNS)
    status = {(r.task, r.method): r.status for r in frame.itertuples()}
    assert status[("mqar", "sdpa_math")] == "ok" and status[("sort", "sdpa_math")] == "ok"
    assert status[("mqar", "q_nan")] == "diverged"
    assert status[("mqar", "q_oom")] == "oom"
    assert status[("mqar", "q_refuses")] == "unsupported"
    assert status[("mqar", "q_layer_mean")] == "ok" and status[("sort", "q_layer_mean")] == "unsupported"
    assert status[("mqar", "sdpa_efficient")] == "unsupported"  # cuda only, by its declaration
    assert set(frame["status"]) <= set(STATUSES)
    failed = frame[frame["status"] != "ok"]
    assert failed["reason"].str.len().gt(0).all() and failed["value"].isna().all()
    ok = frame[frame["status"] == "ok"]
    assert ok["value"].notna().all() and (ok["seq_q"] == ok["seq_q"]).all()
    sort_row = frame[(frame["task"] == "sort") & (frame["method"] == "sdpa_math")].iloc[0]
    assert (sort_row["pattern"], sort_row["seq_q"], sort_row["seq_kv"]) == ("noncausal_cross", 4, 8)
    # a resume skips finished cases
    before = len((run_dir / "quality.jsonl").read_text().splitlines())
    run_train(cfg, "test", show_progress=False)
    assert len((run_dir / "quality.jsonl").read_text().splitlines()) == before


def test_a_case_that_killed_the_process_is_recorded_as_crashed_on_resume(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "q"
    run_dir.mkdir()
    plan = build_train_plan(cfg)
    case = plan.runnable[0]
    (run_dir / "quality.inflight.json").write_text(json.dumps(
        {"case_id": case.case_id, "row": {"case_id": case.case_id, "task": "mqar", "method": "sdpa_math"}}))
    run_train(cfg, "test", show_progress=False)
    rows = [json.loads(line) for line in (run_dir / "quality.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows if r["case_id"] == case.case_id] == ["crashed"]
    assert not (run_dir / "quality.inflight.json").exists()


@pytest.mark.parametrize("change, field", [
    ({"tasks": ["nope"]}, "tasks"),
    ({"methods": ["nope"]}, "methods"),
    ({"seeds": [-1]}, "seeds"),
    ({"dtype": "float8"}, "dtype"),
    ({"task_options": {"mqar": {"bogus": 1}}}, "task_options.mqar"),
    ({"task_options": {"mqar": {"seq_lens": [15]}}}, "task_options.mqar"),
    ({"task_options": {"nope": {}}}, "task_options"),
])
def test_bad_config_fails_before_any_work_naming_the_field(tmp_path, change, field):
    with pytest.raises(ConfigError) as info:
        run_train(_cfg(tmp_path, **change), "test", show_progress=False)
    assert info.value.field == field
    assert not (tmp_path / "q").exists()


def test_cli_train_and_list_tasks(tmp_path, capsys, monkeypatch):
    from attnbench.cli import main

    assert main(["list", "tasks"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in TASKS)
    monkeypatch.chdir(tmp_path)
    code = main(["train", "suite=tasks_cpu", "tasks=[sort]", "methods=[sdpa_math]", "task_options.sort.steps=2",
                 "task_options.sort.seq_lens=[8]", "task_options.sort.batch=4", "task_options.sort.eval_batches=1",
                 "task_options.sort.d_model=16", "run_id=cli", "steps=null"])
    assert code == 0
    frame = pd.read_parquet(tmp_path / "results" / "cli" / "quality.parquet")
    assert frame[["task", "method", "status", "steps"]].values.tolist() == [["sort", "sdpa_math", "ok", 2]]
    assert main(["train", "tasks=[nope]"]) == 2


def test_report_of_a_train_run_ranks_methods_per_pattern(tmp_path):
    from attnbench.report.document import main as report_main

    cfg = _cfg(tmp_path, tasks=["mqar", "niah"], methods=["sdpa_math", "q_nomix", "q_nan"], seeds=[0, 1])
    cfg["task_options"]["mqar"].update(steps=60, lr=1e-2, d_model=32, batch=32, seq_lens=[16, 32], eval_batches=2)
    cfg["task_options"]["niah"] = {**TINY, "seq_lens": [24], "vocab": 64, "key_ids": 8, "value_ids": 8, "depths": 3}
    run_dir = run_train(cfg, "test", show_progress=False)
    assert report_main([str(run_dir)]) == 0
    text = (run_dir / "report.md").read_text()
    section = text[text.index("## Task quality"):]
    assert "causal_self: lengths 16, 24, 32; 2 seed(s)." in section
    mqar = [line for line in section.splitlines() if line.startswith("| sdpa_math") or line.startswith("| q_nomix")
            or line.startswith("| q_nan")]
    assert any(line.startswith("| q_nan") and "diverged ×" in line for line in mqar)
    exact = next(line for line in mqar if line.startswith("| sdpa_math")).split("|")[2]
    assert "(#1)" in exact  # exact attention beats the control on MQAR after 60 steps
    assert (run_dir / "report_files").is_dir() and any((run_dir / "report_files").glob("needle-maps*.png"))


def test_probes_separate_exact_attention_from_a_mixer_that_sees_nothing(tmp_path):
    recall = make("planted_recall", seq=128, distances=[1, 100])
    assert recall.probe("sdpa_math").value == 1.0
    assert recall.probe("q_nomix").value == 0.0
    approx = make("gaussian_approx", seq=64)
    assert approx.probe("reference").value < 1e-5
    assert approx.probe("q_nomix").value > 0.5
    cfg = _cfg(tmp_path, tasks=["planted_recall"], methods=["sdpa_math", "q_layer_mean"],
               task_options={"planted_recall": {"seq_lens": [64], "distances": [1, 10]}})
    frame = load_quality(run_train(cfg, "test", show_progress=False))
    rows = {r.method: r for r in frame.itertuples()}
    assert rows["sdpa_math"].kind == "probe" and rows["sdpa_math"].value == 1.0
    assert json.loads(rows["sdpa_math"].breakdown) == {"d=1": 1.0, "d=10": 1.0}
    assert rows["q_layer_mean"].status == "unsupported"


def test_a_probe_counts_the_pairs_a_sparse_method_attended():
    recall = make("planted_recall", seq=1024, distances=[1, 300])
    # biformer's defaults (4 regions of 256 tokens, topk 4) attend every pair at 1024 tokens: it is dense there
    dense = recall.probe("biformer")
    assert dense.extras["attended_share"] == pytest.approx(1.0)
    sparse = recall.probe("biformer", method_params={"region": 128, "topk": 2})
    assert 0.0 < sparse.extras["attended_share"] < 0.6
    assert "attended_share" not in recall.probe("sdpa_math").extras  # no count declared: nothing claimed


def test_the_one_thread_fixture_applies_here():
    import torch

    assert torch.get_num_threads() == 1
