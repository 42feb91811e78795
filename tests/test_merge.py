"""``attnbench merge``: two run folders written apart become one, as if the second had resumed the first. Every row
keeps the invocation (command, host) that wrote it, the plan and configs are the union, and a case measured in
both is refused before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnbench.cli import main as cli_main
from attnbench.record import envinfo
from attnbench.record.merge import MergeError, merge_into
from attnbench.record.rundir import load_run, write_config
from attnbench.record.store import RowStore

from runfixtures import make_row


def write_run(folder: Path, command: str, methods: list[str], lengths=(1024, 2048), invocations: int = 1) -> None:
    """A run folder as the runner leaves it, ``invocations`` commands each writing every method's rows once."""
    folder.mkdir(parents=True, exist_ok=True)
    store = RowStore(folder)
    per = [methods[i::invocations] for i in range(invocations)]
    for number, chunk in enumerate(per):
        index, _ = envinfo.begin_invocation(folder, folder.name, f"{command} part {number}")
        write_config(folder, {"methods": chunk, "seq_lens": list(lengths), "run_id": folder.name}, index)
        rows = [make_row(folder.name, m, "causal", "fwd", n, invocation=index) for m in chunk for n in lengths]
        for row in rows:
            store.append(row)
        envinfo.end_invocation(folder, index, len(rows))
        plan = folder / "plan.json"
        old = set(json.loads(plan.read_text())["case_ids"]) if plan.is_file() else set()
        ids = sorted(old | {r["case_id"] for r in rows})
        plan.write_text(json.dumps({"planned": len(ids), "case_ids": ids}))
    store.finalize()
    (folder / "logs").mkdir(exist_ok=True)
    (folder / "logs" / "worker-cuda0.log").write_text(command)


def test_merge_keeps_each_rows_invocation_and_unions_plan_and_config(tmp_path):
    into, source = tmp_path / "runs" / "long", tmp_path / "call2" / "long"
    write_run(into, "first call", ["sdpa", "flex"], invocations=2)
    write_run(source, "second call", ["eager", "linear_attn"])
    assert cli_main(["merge", str(into), str(source)]) == 0

    env = json.loads((into / "env.json").read_text())
    commands = [entry["command"] for entry in env["invocations"]]
    assert commands == ["first call part 0", "first call part 1", "second call part 0"]
    rows = [json.loads(line) for line in (into / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for row in rows:  # each row's invocation still names the command that wrote it
        written_by = commands[row["invocation"]]
        assert written_by.startswith("second" if row["method"] in ("eager", "linear_attn") else "first")
    run = load_run(into)
    assert sorted(run.rows["method"].unique()) == ["eager", "flex", "linear_attn", "sdpa"]
    assert not run.warnings  # plan.json covers every row: no "interrupted" or unplanned-case warning
    assert json.loads((into / "plan.json").read_text())["planned"] == 8
    assert sorted((p.name for p in into.glob("config.*.yaml"))) == ["config.0.yaml", "config.1.yaml", "config.2.yaml"]
    assert "linear_attn" in (into / "config.yaml").read_text() and "flex" in (into / "config.yaml").read_text()
    assert (into / "logs" / "from-long" / "worker-cuda0.log").read_text() == "second call"
    assert env["merged_from"] == [{"folder": "long", "invocations": [2, 2]}]
    assert (source / "rows.jsonl").read_text().count("\n") == 4  # FROM is left as it was


def test_merge_refuses_a_case_in_both_before_writing(tmp_path, capsys):
    """Negative control: the same case measured in both folders; nothing in INTO changes."""
    into, source = tmp_path / "a" / "run", tmp_path / "b" / "run"
    write_run(into, "first", ["sdpa"])
    write_run(source, "second", ["sdpa", "eager"])
    before = {p.name: p.read_bytes() for p in into.iterdir() if p.is_file()}
    with pytest.raises(MergeError, match="have rows in both"):
        merge_into(into, source)
    assert cli_main(["merge", str(into), str(source)]) == 2
    assert "sdpa|causal|fwd|1024" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in into.iterdir() if p.is_file()} == before


def test_merge_refuses_what_is_not_a_run_folder(tmp_path, capsys):
    into = tmp_path / "run"
    write_run(into, "first", ["sdpa"])
    (tmp_path / "empty").mkdir()
    assert cli_main(["merge", str(into), str(tmp_path / "empty")]) == 2
    assert "FROM" in capsys.readouterr().err
    with pytest.raises(MergeError, match="INTO itself"):
        merge_into(into, into)


def test_merge_into_a_new_folder_makes_it_from_the_sources(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, "node a", ["sdpa"])
    write_run(b, "node b", ["eager"])
    assert cli_main(["merge", str(tmp_path / "all"), str(a), str(b)]) == 0
    run = load_run(tmp_path / "all")
    assert sorted(run.rows["method"].unique()) == ["eager", "sdpa"] and not run.warnings
    env = json.loads((tmp_path / "all" / "env.json").read_text())
    assert [e["command"] for e in env["invocations"]] == ["node a part 0", "node b part 0"]
    assert set(run.rows["run_id"]) == {"all"}


def test_a_line_cut_short_in_from_is_left_out_and_named(tmp_path, capsys):
    """As a resume reads a rows.jsonl: a crash's partial last line is skipped (its case runs again), not merged."""
    into, source = tmp_path / "a" / "run", tmp_path / "b" / "run"
    write_run(into, "first", ["sdpa"])
    write_run(source, "second", ["eager"])
    with open(source / "rows.jsonl", "a") as handle:
        handle.write('{"case_id": "cut sh')
    assert cli_main(["merge", str(into), str(source)]) == 0
    assert "rows.jsonl:3: unreadable line skipped" in capsys.readouterr().out
    assert len(load_run(into).rows) == 4


def _went_on(committed: Path, copy: Path, command: str, methods: list[str], retry: str | None = None) -> None:
    """``copy``: the committed run copied to a device and resumed there by ``command`` (``retry``: a method of
    the committed run whose case is measured again, as ``retry=`` does)."""
    import shutil
    shutil.copytree(committed, copy)
    write_run(copy, command, methods)
    if retry:
        store = RowStore(copy)
        index, _ = envinfo.begin_invocation(copy, copy.name, f"{command} retry")
        write_config(copy, {"methods": [retry], "retry": ["ok"], "run_id": copy.name}, index)
        store.append(make_row(copy.name, retry, "causal", "fwd", 1024, invocation=index, ms=1.0))
        envinfo.end_invocation(copy, index, 1)
        store.finalize()


def test_two_copies_that_resumed_the_committed_run_merge_without_repeating_its_history(tmp_path, capsys):
    """Two device calls each resumed a copy of the committed run: only what each added moves, once, each row
    still naming its own command; the committed rows are not doubled and a retry row stays after the old one."""
    committed = tmp_path / "results" / "run"
    write_run(committed, "committed", ["sdpa", "flex"], invocations=2)
    call_a, call_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    _went_on(committed, call_a, "call a", ["eager"], retry="sdpa")
    _went_on(committed, call_b, "call b", ["linear_attn"])
    assert cli_main(["merge", str(committed), str(call_a), str(call_b)]) == 0
    assert "after 2 shared" in capsys.readouterr().out

    env = json.loads((committed / "env.json").read_text())
    commands = [entry["command"] for entry in env["invocations"]]
    assert commands == ["committed part 0", "committed part 1", "call a part 0", "call a retry", "call b part 0"]
    assert len(env["commands"]) == 5
    rows = [json.loads(line) for line in (committed / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4 + 2 + 1 + 2  # committed, call a's eager + its retry, call b's linear_attn
    for row in rows:
        written_by = commands[row["invocation"]]
        expected = {"eager": "call a part", "linear_attn": "call b"}.get(row["method"], "committed")
        if row.get("ms_median") == 1.0:
            expected = "call a retry"
        assert written_by.startswith(expected), (row["case_id"], written_by)
    sdpa = [r for r in rows if r["case_id"] == "sdpa|causal|fwd|1024|1|16|128|bf16"]
    assert [r["ms_median"] == 1.0 for r in sdpa] == [False, True]  # the retry after the older row
    assert sorted(p.name for p in committed.glob("config.*.yaml")) == [f"config.{k}.yaml" for k in range(5)]
    assert (committed / "logs" / "from-run" / "worker-cuda0.log").read_text() == "call a"
    assert (committed / "logs" / "from-run-2" / "worker-cuda0.log").read_text() == "call b"
    assert [m["invocations"] for m in env["merged_from"]] == [[2, 3], [4, 4]]
    run = load_run(committed)
    assert sorted(run.rows["method"].unique()) == ["eager", "flex", "linear_attn", "sdpa"]


def test_a_copy_whose_history_differs_is_refused(tmp_path):
    """Negative control: a shared-history row changed in the copy (not the run INTO holds) is refused, nothing
    written; and both copies measuring the same new case is refused as any case in both is."""
    committed = tmp_path / "results" / "run"
    write_run(committed, "committed", ["sdpa"])
    call_a, call_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    _went_on(committed, call_a, "call a", ["eager"])
    _went_on(committed, call_b, "call b", ["eager"])
    lines = (call_a / "rows.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["ms_median"] = 123.0
    (call_a / "rows.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    before = (committed / "rows.jsonl").read_bytes()
    with pytest.raises(MergeError, match="do not share that history"):
        merge_into(committed, call_a)
    assert (committed / "rows.jsonl").read_bytes() == before
    (call_a / "rows.jsonl").write_text("\n".join(lines) + "\n")
    merge_into(committed, call_a)
    with pytest.raises(MergeError, match="have rows in both"):
        merge_into(committed, call_b)
