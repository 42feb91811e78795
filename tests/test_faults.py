"""Bad input and faults: huge lengths are refused from closed forms in bounded memory, workers die with their
parent, Ctrl-C / SIGTERM end a sweep cleanly and resumably, junk in rows files is skipped with a warning, and a
CPU allocation failure is an ``oom`` row."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from attnbench.execute.runner import run_sweep
from attnbench.record.store import RowStore, read_jsonl
from runfixtures import make_row, write_run

REPO = Path(__file__).resolve().parents[1]
FAULTY = str(REPO / "tests" / "plugins" / "faulty_methods.py")


def _cli(*args, cwd, env=None):
    return [sys.executable, "-m", "attnbench.cli", *args], dict(
        cwd=cwd, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **(env or {})})


# ---- sizes -----------------------------------------------------------------------------------------------------
def _limit_address_space():  # 6 GiB: the parent that counted pairs row by row needed 24 GB at this length
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def test_a_billion_tokens_gets_its_rows_in_bounded_memory(tmp_path):
    args, kw = _cli("sweep=smoke", "device=cpu", f"results_dir={tmp_path}", "run_id=huge", "seq_lens=[1000000000]",
                    "cross_lens=[]", "modes=[fwd,decode]", "masks=[full,causal,'sliding_window(left=8)']",
                    cwd=tmp_path)
    done = subprocess.run(args, **kw, capture_output=True, text=True, timeout=300, preexec_fn=_limit_address_space)
    assert done.returncode == 0, done.stderr[-3000:]
    frame = pd.read_parquet(tmp_path / "huge" / "rows.parquet")
    assert len(frame) == 8 * 3 * 2 and set(frame.status) == {"unsupported"}, frame[["method", "status", "reason"]]
    reasons = " | ".join(frame.reason)
    assert "inputs alone need" in reasons and "too large to plan" in reasons
    full = frame[(frame["mask"] == "full") & (frame["mode"] == "fwd")]
    assert set(full.visible_pairs) == {10**18}  # closed form, exact
    window = frame[frame["mask"] == "sliding_window(left=8)"]
    assert window.visible_pairs.isna().all()  # not counted, never estimated
    runs_it = window[window.method.isin(["reference", "sdpa_math"])]  # CPU methods that run any mask
    assert len(runs_it) == 4 and runs_it.reason.str.contains("too large to plan").all(), runs_it.reason


def test_masks_without_a_closed_form_are_refused_over_the_bound_before_binding(monkeypatch):
    from attnbench import masks
    from attnbench.config import plan as plan_module

    stripes = masks.register_mask_mod("t_stripes", lambda b, h, q, kv: (kv % 3) == 0)
    monkeypatch.setitem(masks.MASKS, "t_stripes", masks.MASKS.pop("t_stripes"))  # unregistered after the test
    assert stripes is masks.MASKS["t_stripes"]
    spec = masks.make_mask("t_stripes")
    assert plan_module.mask_size_problem(spec, 64, 64) is None
    problem = plan_module.mask_size_problem(spec, 1 << 20, 1 << 20)
    assert "mask_mod on 1,099,511,627,776 (q, kv) pairs" in problem
    window = masks.make_mask("sliding_window(left=8)")
    assert plan_module.mask_size_problem(window, 1 << 20, 1 << 20) is None
    assert "O(seq) closed form" in plan_module.mask_size_problem(window, 1 << 26, 1 << 26)
    bigbird = masks.make_mask("bigbird(block=64)")
    assert "block table" in plan_module.mask_size_problem(bigbird, 1 << 22, 1 << 22)
    monkeypatch.setattr(spec.bound_cls, "visible_pairs", lambda self: pytest.fail("counted past the bound"))
    from attnbench.record.rows import mask_facts

    assert mask_facts("t_stripes", 1 << 20, 1 << 20) == (False, None)


# ---- workers die with their parent; interrupts end a sweep cleanly -----------------------------------------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


HANG = ["sweep=smoke", "device=cpu", f"plugins=[{FAULTY}]", "methods=[t_good,t_hangs]", "masks=[causal]",
        "seq_lens=[32]", "cross_lens=[]", "modes=[fwd]", "heads_kv=null", "run_id=hang", "timing.budget_ms=2",
        "timing.min_reps=2", "timing.max_reps=3"]


def _start_hung_sweep(tmp_path, *extra):
    marker = tmp_path / "hung.pid"
    args, kw = _cli(*HANG, f"results_dir={tmp_path / 'results'}", "case_timeout_s=300", *extra, cwd=tmp_path,
                    env={"ATTNBENCH_TEST_HANG_MARKER": str(marker)})
    parent = subprocess.Popen(args, **kw, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not _wait(lambda: marker.is_file() and marker.read_text().strip(), 180):
        parent.kill()
        pytest.fail(f"the worker never reached the hanging call: {parent.communicate()[1][-2000:]}")
    return parent, int(marker.read_text())


def _kill_leftover(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_a_stuck_worker_dies_when_its_parent_is_killed(tmp_path):
    parent, worker = _start_hung_sweep(tmp_path)
    try:
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        assert _wait(lambda: not _alive(worker), 30), "the worker outlived its SIGKILLed parent"
    finally:
        _kill_leftover(worker)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_ends_the_sweep_cleanly_and_the_run_resumes(tmp_path, signum):
    parent, worker = _start_hung_sweep(tmp_path)
    try:
        parent.send_signal(signum)
        _, stderr = parent.communicate(timeout=60)
        assert parent.returncode == 128 + signum, stderr[-2000:]
        assert "Traceback" not in stderr and "run_id=hang to resume" in stderr
        assert _wait(lambda: not _alive(worker), 30), "the worker outlived the interrupted sweep"
    finally:
        _kill_leftover(worker)
    run = tmp_path / "results" / "hang"
    rows = read_jsonl(run / "rows.jsonl")
    assert [(r["method"], r["status"]) for r in rows] == [("t_good", "ok")]  # the hung case has no row
    assert len(pd.read_parquet(run / "rows.parquet")) == 1
    assert json.loads((run / "env.json").read_text())["interrupted_by"] == signal.Signals(signum).name
    if signum == signal.SIGTERM:  # resume: the finished row is kept, only the unfinished case runs
        args, kw = _cli(*HANG, f"results_dir={tmp_path / 'results'}", "case_timeout_s=1", cwd=tmp_path)  # only t_hangs runs
        done = subprocess.run(args, **kw, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        again = read_jsonl(run / "rows.jsonl")
        assert again[0] == rows[0] and [(r["method"], r["status"]) for r in again[1:]] == [("t_hangs", "timeout")]


def test_the_interrupt_message_counts_the_cases_of_this_invocation_not_the_whole_run(tmp_path):
    """A resumed run holds rows of other invocations' cases: "N of M cases recorded" counts this plan's cases only
    (the H200 logs said "244 of 52 cases recorded" for a 52-case invocation into a 244-row run)."""
    args, kw = _cli(*HANG[:3], "methods=[t_good]", *HANG[4:5], "seq_lens=[16,24]", *HANG[6:],
                    f"results_dir={tmp_path / 'results'}", cwd=tmp_path)
    first = subprocess.run(args, **kw, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    parent, worker = _start_hung_sweep(tmp_path)
    try:
        parent.send_signal(signal.SIGTERM)
        _, stderr = parent.communicate(timeout=60)
    finally:
        _kill_leftover(worker)
    assert len(read_jsonl(tmp_path / "results" / "hang" / "rows.jsonl")) == 3  # 2 earlier rows + t_good at 32
    assert "1 of 2 cases recorded" in stderr, stderr[-2000:]


def test_a_stuck_cp_rank_dies_when_its_parent_is_killed(tmp_path):
    """Ranks of a context-parallel gang are children of the runner like device workers, and die with it too."""
    marker = tmp_path / "rank.pid"
    plugin = str(Path(FAULTY).with_name("cp_faulty.py"))
    args, kw = _cli("sweep=smoke", "device=cpu", f"plugins=[{plugin}]", "methods=[t_cp_rank1_hangs]",
                    "masks=[causal]", "seq_lens=[32]", "cross_lens=[]", "modes=[fwd]", "heads_q=2", "heads_kv=2",
                    "head_dim=8", "batch=1", "layouts=[ulysses]", "cp=[2]", "case_timeout_s=300", "run_id=cphang",
                    f"results_dir={tmp_path / 'results'}", "timing.budget_ms=2", "timing.min_reps=2",
                    "timing.max_reps=3", cwd=tmp_path, env={"ATTNBENCH_TEST_HANG_MARKER": str(marker)})
    parent = subprocess.Popen(args, **kw, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not _wait(lambda: marker.is_file() and marker.read_text().strip(), 180):
        parent.kill()
        pytest.fail(f"rank 1 never reached the hanging call: {parent.communicate()[1][-2000:]}")
    rank = int(marker.read_text())
    try:
        assert _alive(rank)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        assert _wait(lambda: not _alive(rank), 30), "the CP rank outlived its SIGKILLed parent"
    finally:
        _kill_leftover(rank)


def test_the_watchdog_ends_a_worker_whose_parent_closed_the_pipe():
    from attnbench.execute.worker import start_watchdog

    read_fd, write_fd = os.pipe()
    lost = threading.Event()
    try:
        start_watchdog(os.getppid(), read_fd, on_lost=lost.set, period_s=0.05)
        assert not lost.wait(0.5)  # parent alive, pipe open: nothing happens
        os.close(write_fd)
        assert lost.wait(5)
    finally:
        os.close(read_fd)
    other = threading.Event()
    keep_r, keep_w = os.pipe()
    try:
        start_watchdog(os.getppid() + 1, keep_r, on_lost=other.set, period_s=0.05)  # re-parented: parent gone
        assert other.wait(5)
    finally:
        os.close(keep_r)
        os.close(keep_w)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_a_worker_asks_the_kernel_for_sigkill_when_its_parent_dies():
    code = ("import ctypes, os; from attnbench.execute.worker import die_with_parent; die_with_parent(os.getppid()); "
            "v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == str(int(signal.SIGKILL)), done.stderr


def test_a_finished_worker_exits_with_its_code_and_its_log_flushed(tmp_path):
    """``exit_now`` (how a worker or a rank ends, without the interpreter's teardown): the exit code is kept and
    what Python and C code wrote into the log (a file: block-buffered) reaches it. The control: ``os._exit`` alone
    loses both."""
    code = ("import ctypes, os, sys; from attnbench.execute.worker import exit_now; sys.stdout.write('py-out '); "
            "sys.stderr.write('py-err '); ctypes.CDLL(None).printf(b'c-out'); {}(3)")
    for end, kept in (("exit_now", True), ("os._exit", False)):
        log = tmp_path / f"{end}.log"
        with open(log, "w") as handle:
            done = subprocess.run([sys.executable, "-c", code.format(end)], stdout=handle, stderr=handle,
                                  timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert done.returncode == 3
        text = log.read_text()
        assert all((part in text) == kept for part in ("py-out", "py-err", "c-out")), (end, text)


# ---- rows files with junk --------------------------------------------------------------------------------------
JUNK = ['[1, 2]', '"text"', '7', 'null', '{"a": 1}', '{"case_id": 5, "status": "ok"}',
        '{"case_id": "x", "status": "ok", "seq_q": [1]}', '{"case_id": "y", "status": "sideways"}']


def _run_with_junk(tmp_path) -> Path:
    rows = [make_row("junk", m, "causal", "fwd", 1024) for m in ("sdpa", "flex")]
    folder = write_run(tmp_path, "junk", rows, formats=("jsonl",))
    lines = (folder / "rows.jsonl").read_text().splitlines()
    (folder / "rows.jsonl").write_text("\n".join([lines[0], *JUNK, lines[1]]) + "\n")
    return folder


def test_junk_lines_in_rows_jsonl_are_skipped_with_a_warning_naming_each(tmp_path, capsys):
    from attnbench.record.rundir import load_run
    from attnbench.report import document

    folder = _run_with_junk(tmp_path)
    store = RowStore(folder)
    assert [r["method"] for r in store.rows] == ["sdpa", "flex"] and len(store.done) == 2
    assert [w.split(":")[1] for w in store.warnings] == [str(n) for n in range(2, 2 + len(JUNK))]
    assert all("not a row" in w for w in store.warnings)
    run = load_run(folder)
    assert list(run.rows.method) == ["sdpa", "flex"]
    assert sum("rows.jsonl:3: not a row" in w for w in run.warnings) == 1
    assert document.main([str(folder)]) == 0
    assert (folder / "report.md").is_file()


def test_a_resumed_run_skips_junk_lines(cfg, capsys):
    cfg.update(methods=["reference"], masks=["full"])
    run_dir = run_sweep(cfg, "test", show_progress=False)
    with open(run_dir / "rows.jsonl", "a") as handle:
        handle.write("[1, 2]\n\"x\"\n")
    capsys.readouterr()
    run_sweep(cfg, "test", show_progress=False)
    assert "rows.jsonl:2: not a row" in capsys.readouterr().err
    assert len(read_jsonl(run_dir / "rows.jsonl")) == 1  # nothing ran again


def test_a_corrupt_parquet_falls_back_to_rows_jsonl_with_a_warning(tmp_path):
    from attnbench.record.rundir import RunDirError, load_run

    rows = [make_row("bad", m, "causal", "fwd", 1024) for m in ("sdpa", "flex")]
    folder = write_run(tmp_path, "bad", rows, formats=("parquet", "jsonl"))
    (folder / "rows.parquet").write_bytes(b"PAR1 this is not a parquet file")
    run = load_run(folder)
    assert sorted(run.rows.method) == ["flex", "sdpa"]
    assert any(w.startswith("rows.parquet is unreadable") for w in run.warnings), run.warnings
    (folder / "rows.jsonl").unlink()
    with pytest.raises(RunDirError, match="rows.parquet"):
        load_run(folder)


# ---- CPU out of memory ---------------------------------------------------------------------------------------
def test_a_cpu_allocation_failure_is_an_oom_row(cfg, faulty):
    cfg.update(plugins=[faulty], methods=["t_cpu_oom", "t_memory_error", "t_raises"], masks=["full"])
    frame = pd.read_parquet(run_sweep(cfg, "test", show_progress=False) / "rows.parquet").set_index("method")
    assert frame.loc["t_cpu_oom", "status"] == "oom", frame.loc["t_cpu_oom", "reason"]
    assert "DefaultCPUAllocator" in frame.loc["t_cpu_oom", "reason"]
    assert frame.loc["t_memory_error", "status"] == "oom", frame.loc["t_memory_error", "reason"]
    assert frame.loc["t_raises", "status"] == "error"


def test_classification_of_allocation_failures():
    from attnbench.execute.worker import _classify
    from attnbench.masks import MaskTooLarge

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                       "tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")
    assert _classify(cpu) == "oom" and _classify(MemoryError()) == "oom"
    assert _classify(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "oom"
    assert _classify(MaskTooLarge("dense mask", 2**40, 2**30)) == "error"  # a budget refusal, not an OOM
    assert _classify(ValueError("shape mismatch")) == "error"
