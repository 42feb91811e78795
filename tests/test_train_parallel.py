"""`attnbench train parallel=N`: N cases at once in spawned workers, rows written by the parent alone.

Each test here that starts a pool of workers costs a few seconds (every worker imports torch): keep them few."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnbench.execute import train
from attnbench.execute.train import build_train_plan, run_train
from attnbench.record.quality import QUALITY_COLUMNS, load_quality

PLUGINS = Path(__file__).resolve().parent / "plugins"
FAULTY = str(PLUGINS / "train_faulty.py")
TINY = dict(d_model=16, heads=2, layers=1, batch=4, eval_batches=1, warmup=1)
MEASURED = ["value", "final_loss", "steps_done", "extras", "breakdown", "parameters", "status"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _cfg(tmp_path, run_id, **extra):
    cfg = {"tasks": ["mqar"], "methods": ["sdpa_math"], "seeds": [0, 1], "dtype": "float32", "device": "cpu",
           "results_dir": str(tmp_path), "run_id": run_id, "plugins": [FAULTY], "case_timeout_s": 120,
           "task_options": {"mqar": {**TINY, "steps": 12, "vocab": 64, "kv_pairs": 2, "seq_lens": [16]},
                            "sort": {**TINY, "steps": 12, "seq_lens": [8]}}}
    cfg.update(extra)
    return cfg


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "quality.jsonl").read_text().splitlines()]


def test_quality_values_do_not_depend_on_parallel(tmp_path):
    cfg = dict(tasks=["mqar", "sort"])
    serial = load_quality(run_train(_cfg(tmp_path, "serial", **cfg), "test", show_progress=False))
    pooled = load_quality(run_train(_cfg(tmp_path, "pooled", parallel=2, **cfg), "test", show_progress=False))
    assert len(serial) == len(pooled) == 4 and set(serial["status"]) == {"ok"}
    assert set(serial["concurrent"]) == {1} and set(pooled["concurrent"]) == {2}
    assert pooled["tokens_per_s"].notna().all() and pooled["wall_s"].notna().all()
    one, two = (frame.set_index("case_id").sort_index()[MEASURED] for frame in (serial, pooled))
    # seeded CPU float32 with one torch thread in both processes: bit-identical, not merely close
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(one, two)
    # negative control: the comparison sees a change of seed (seed 1's rows against seed 0's of the same task)
    by_seed = serial.set_index(["task", "seed"]).sort_index()
    assert not by_seed.loc[("mqar", 0), "final_loss"] == by_seed.loc[("mqar", 1), "final_loss"]
    assert (pooled["wall_s"] > 0).all() and (pooled["train_wall_s"] > 0).all()
    assert not list((tmp_path / "pooled").glob("quality.inflight*"))


def test_a_worker_that_dies_breaks_only_its_pool(tmp_path):
    # order: q_kills s0, q_kills s1 (pool 1: s0 ends its worker), then sdpa_math s0, s1 in a fresh pool
    cfg = _cfg(tmp_path, "kill", methods=["q_kills", "sdpa_math"], parallel=2)
    plan = build_train_plan(cfg)
    assert [(c.method, c.seed) for c in plan.runnable] == [("q_kills", 0), ("q_kills", 1), ("sdpa_math", 0),
                                                           ("sdpa_math", 1)]
    run_dir = run_train(cfg, "test", show_progress=False)
    rows = _rows(run_dir)
    assert sorted(r["case_id"] for r in rows) == sorted(c.case_id for c in plan.runnable)  # one row each
    status = {(r["method"], r["seed"]): r for r in rows}
    killer = status[("q_kills", 0)]
    assert killer["status"] == "crashed" and "worker process" in killer["reason"] and "139" in killer["reason"]
    # the other three: a pool of 2 holds the killer and at most one case beside it when it dies (q_kills s1, or a
    # later case when the other worker finished earlier ones first: spawned workers start at different times);
    # that one is `crashed` with the reason naming the pool's death, every other case ran and is ok
    innocents = [status[key] for key in (("q_kills", 1), ("sdpa_math", 0), ("sdpa_math", 1))]
    crashed = [r for r in innocents if r["status"] == "crashed"]
    assert len(crashed) <= 1, [(r["method"], r["seed"], r["reason"]) for r in crashed]
    for r in crashed:
        assert "1 other case(s) were in flight" in r["reason"]
    assert all(r["status"] == "ok" for r in innocents if r["status"] != "crashed")
    assert not list(run_dir.glob("quality.inflight*"))
    # resumable: the same run_id again runs nothing and adds no row
    run_train(cfg, "test", show_progress=False)
    assert len(_rows(run_dir)) == len(rows)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_ends_the_workers_keeps_the_rows_and_resumes(tmp_path):
    hang = tmp_path / "hang"
    hang.mkdir()
    args = ["suite=tasks_cpu", "tasks=[mqar]", "methods=[sdpa_math,q_hangs]", "seeds=[0,1]", "steps=4",
            f"plugins=[{FAULTY}]", "parallel=2", "run_id=stop", f"results_dir={tmp_path}",
            *(f"task_options.mqar.{k}={v}" for k, v in {**TINY, "vocab": 64, "kv_pairs": 2}.items()),
            "task_options.mqar.seq_lens=[16]"]
    env = {**os.environ, "ATTNBENCH_TEST_HANG_DIR": str(hang), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-m", "attnbench.cli", "train", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "stop"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and parent.poll() is None:
        if len(list(hang.glob("*.pid"))) == 2:  # both q_hangs cases hang in their workers
            break
        time.sleep(0.2)
    output = parent.stdout.read1().decode() if parent.poll() is not None else ""
    assert parent.poll() is None and len(list(hang.glob("*.pid"))) == 2, output
    workers = [int(p.stem) for p in hang.glob("*.pid")]
    assert len(list(run_dir.glob("quality.inflight.*.json"))) == 2  # one marker per case in flight
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)  # no orphan left running
    rows = _rows(run_dir)
    assert sorted((r["method"], r["seed"], r["status"]) for r in rows) == [("sdpa_math", 0, "ok"),
                                                                           ("sdpa_math", 1, "ok")]
    assert not list(run_dir.glob("quality.inflight*"))  # the cases in flight left no row and no marker
    # resume (here, without the hang and one at a time): the two cases left run, nothing runs twice
    cfg = _cfg(tmp_path, "stop", methods=["sdpa_math", "q_hangs"], steps=4)
    cfg["task_options"] = {"mqar": {**TINY, "vocab": 64, "kv_pairs": 2, "seq_lens": [16], "steps": 4}}
    resumed = load_quality(run_train(cfg, "test", show_progress=False))
    assert sorted(zip(resumed["method"], resumed["seed"], resumed["status"])) == [
        ("q_hangs", 0, "ok"), ("q_hangs", 1, "ok"), ("sdpa_math", 0, "ok"), ("sdpa_math", 1, "ok")]
    assert len(_rows(run_dir)) == 4


def test_markers_of_every_case_in_flight_become_crashed_rows_on_resume(tmp_path):
    cfg = _cfg(tmp_path, "q", parallel=1)
    run_dir = tmp_path / "q"
    run_dir.mkdir()
    first, second = build_train_plan(cfg).runnable
    row = {"task": "mqar", "method": "sdpa_math", "concurrent": 2}
    for case in (first, second):  # an invocation with parallel=2 killed with both in flight
        (run_dir / f"quality.inflight.{case.case_id}.json").write_text(
            json.dumps({"case_id": case.case_id, "row": {**row, "case_id": case.case_id}}))
    (run_dir / "quality.inflight.json").write_text("{not json")  # a torn marker is dropped, not fatal
    run_train(cfg, "test", show_progress=False)
    rows = _rows(run_dir)
    assert [r["status"] for r in rows] == ["crashed", "crashed"]
    assert all("parallel=2" in r["reason"] for r in rows)
    assert not list(run_dir.glob("quality.inflight*"))


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_a_bad_parallel_value_fails_before_any_work(tmp_path, value):
    from attnbench.config.plan import ConfigError

    with pytest.raises(ConfigError) as info:
        run_train(_cfg(tmp_path, "bad", parallel=value), "test", show_progress=False)
    assert info.value.field == "parallel"
    assert not (tmp_path / "bad").exists()


def test_workers_share_the_cpu_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert [train._worker_threads(n) for n in (1, 2, 3, 8)] == [4, 2, 1, 1]
    finally:  # not 4 threads on a 2-core box for every later test in this process
        torch.set_num_threads(threads)


def test_parallel_is_a_documented_config_key_and_a_quality_column():
    from hydra import compose, initialize_config_dir

    from attnbench.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="t"):
        assert compose(config_name="train")["parallel"] == 1
        assert compose(config_name="train", overrides=["parallel=3"])["parallel"] == 3
    assert QUALITY_COLUMNS["concurrent"][0] == "Int64" and "parallel" in QUALITY_COLUMNS["concurrent"][1]


def test_the_report_says_when_throughput_was_measured_sharing_the_device():
    import pandas as pd

    from attnbench.report.sections.quality import shared_device_note

    alone = pd.DataFrame({"tokens_per_s": [1.0, 2.0, 3.0], "concurrent": [1.0, float("nan"), 1.0]})
    assert shared_device_note(alone) == ""  # serial rows and rows from before the column: no note
    shared = alone.assign(concurrent=[1.0, 4.0, 2.0])
    note = shared_device_note(shared)
    assert "2 of 3 row(s)" in note and "up to 4 cases" in note and "`concurrent`" in note


def _timeout_sigterm(parent: subprocess.Popen) -> None:
    """What coreutils `timeout` does (its child leads a process group): SIGTERM to the child, then to the whole
    group (the workers too), then SIGCONT; here a second SIGTERM to the child follows while it cleans up."""
    os.kill(parent.pid, signal.SIGTERM)
    os.killpg(parent.pid, signal.SIGTERM)
    os.killpg(parent.pid, signal.SIGCONT)
    time.sleep(0.005)
    try:
        os.kill(parent.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, process groups")
@pytest.mark.parametrize("moment", ["spawning", "running"])
def test_sigterm_at_any_moment_leaves_no_marker_and_no_crashed_row_on_resume(tmp_path, moment):
    """An invocation killed by `timeout` while its pool starts (the first marker written, the workers being
    spawned) or while its cases run: on resume no case is `crashed` and each has exactly one row (H200: the
    cases in flight became `crashed` rows, their markers left by an interrupted clean-up)."""
    hang = tmp_path / "hang"
    hang.mkdir()
    args = ["suite=tasks_cpu", "tasks=[mqar]", "methods=[sdpa_math,q_hangs]", "seeds=[0,1]", "steps=4",
            f"plugins=[{FAULTY}]", "parallel=2", "run_id=term", f"results_dir={tmp_path}",
            *(f"task_options.mqar.{k}={v}" for k, v in {**TINY, "vocab": 64, "kv_pairs": 2}.items()),
            "task_options.mqar.seq_lens=[16]"]
    env = {**os.environ, "ATTNBENCH_TEST_HANG_DIR": str(hang), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-m", "attnbench.cli", "train", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = tmp_path / "term"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and parent.poll() is None:
            if moment == "spawning" and list(run_dir.glob("quality.inflight.*.json")):
                break
            if moment == "running" and len(list(hang.glob("*.pid"))) == 2:
                break
            time.sleep(0.002)
        output = parent.stdout.read1().decode() if parent.poll() is not None else ""
        assert parent.poll() is None, output
        in_flight = len(list(run_dir.glob("quality.inflight.*.json")))
        assert in_flight >= 1  # the signal comes with a case in flight
        _timeout_sigterm(parent)
        # SystemExit(143), or the default action of the second SIGTERM once the handlers are restored on the way out
        assert parent.wait(timeout=60) in (128 + signal.SIGTERM, -signal.SIGTERM)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    assert not list(run_dir.glob("quality.inflight*"))  # the cases in flight left no marker
    # resume (without the hang, one at a time): every case runs to one `ok` row, none is blamed
    cfg = _cfg(tmp_path, "term", methods=["sdpa_math", "q_hangs"], steps=4)
    cfg["task_options"] = {"mqar": {**TINY, "vocab": 64, "kv_pairs": 2, "seq_lens": [16], "steps": 4}}
    run_train(cfg, "test", show_progress=False)
    plan = build_train_plan(cfg)  # after run_train, which loads the plugin (q_hangs)
    rows = _rows(run_dir)
    assert not [r for r in rows if r["status"] == "crashed"], [r["reason"] for r in rows]
    assert sorted(r["case_id"] for r in rows) == sorted(c.case_id for c in plan.runnable)  # exactly one row each
    assert {r["status"] for r in rows} == {"ok"}


def test_only_the_first_signal_raises(monkeypatch):
    """`timeout` signals the process and then its group: the second SIGTERM must not raise inside the clean-up."""
    monkeypatch.setattr(train, "_STOPPING", [])
    with pytest.raises(SystemExit) as info:
        train._stop(signal.SIGTERM, None)
    assert info.value.code == 128 + signal.SIGTERM
    assert train._stop(signal.SIGTERM, None) is None and train._stop(signal.SIGINT, None) is None
    monkeypatch.setattr(train, "_STOPPING", [])
    with pytest.raises(KeyboardInterrupt):
        train._stop(signal.SIGINT, None)


class _FakePool:
    """A stand-in pool for ``_run_parallel``'s bookkeeping: futures resolve at once; the case named ``kill`` breaks
    the pool (its future and every later submit fail with BrokenProcessPool), as a worker's death does between the
    parent's ``wait`` and its next ``submit``."""

    pools: list = []

    def __init__(self, *args, **kwargs):
        self.submitted, self.broken = [], False
        _FakePool.pools.append(self)

    def submit(self, fn, case, *args):
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        if self.broken:
            raise BrokenProcessPool("broken")
        self.submitted.append(case.case_id)
        future = Future()
        if case.case_id == "kill":
            self.broken = True
            future.set_exception(BrokenProcessPool("died"))
        else:
            future.set_result({"status": "ok"})
        return future

    def shutdown(self, *args, **kwargs):
        pass


def test_a_case_refused_by_a_pool_broken_under_it_runs_in_the_next_pool(monkeypatch):
    import concurrent.futures
    from types import SimpleNamespace

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _FakePool)
    _FakePool.pools = []
    cases = [SimpleNamespace(case_id=name) for name in ("ok1", "kill", "after1", "after2")]
    begun, finished, abandoned = [], {}, []

    def begin(case):
        begun.append(case.case_id)
        return {}

    def finish(case, row):
        assert case.case_id not in finished, "two rows for one case"
        finished[case.case_id] = row["status"]

    train._run_parallel(cases, 4, begin, finish, lambda ids=None: abandoned.append(ids), (), [])
    assert finished == {"ok1": "ok", "kill": "crashed", "after1": "ok", "after2": "ok"}
    assert abandoned == [["after1"]]  # its marker removed: it did not run in the broken pool
    assert _FakePool.pools[0].submitted == ["ok1", "kill"] and _FakePool.pools[1].submitted == ["after1", "after2"]


def test_a_plan_built_alone_loads_the_configs_plugins(tmp_path):
    # a fresh interpreter: in this one an earlier test may have loaded the plugin already
    code = ("import json, sys; from attnbench.execute.train import build_train_plan; "
            "plan = build_train_plan(json.loads(sys.argv[1])); print(sorted({c.method for c in plan.runnable}))")
    cfg = _cfg(tmp_path, "alone", methods=["q_kills"])
    done = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "['q_kills']" in done.stdout
