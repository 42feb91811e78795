"""Loading run folders (bench.rundir): formats, crash leftovers, missing files, merging."""
import json

import pytest
from runfixtures import H200, env_for, make_row, write_run

from attnbench.record.rundir import RunDirError, load_run, merge_runs
from attnbench.record.schema import COLUMNS


def rows_for(run_id, n=3, **extra):
    return [make_row(run_id, "sdpa", "causal", "fwd", 1024 * 2**i, **extra) for i in range(n)]


def test_parquet_rows_are_typed_and_keep_extra_columns(tmp_path):
    rows = rows_for("r1", task="recall", quality=0.9)
    run = load_run(write_run(tmp_path, "r1", rows, env_for("r1"), {"methods": ["sdpa"]}))
    assert list(run.rows.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert str(run.rows["ms_median"].dtype) == "Float64"
    assert str(run.rows["seq_kv"].dtype) == "Int64"
    assert run.rows["quality"].tolist() == [0.9] * 3
    assert run.config == {"methods": ["sdpa"]}
    assert run.env["device"] == H200 and run.device == H200


def test_parquet_wins_over_jsonl(tmp_path):
    folder = write_run(tmp_path, "r1", rows_for("r1", n=2), formats=("parquet",))
    (folder / "rows.jsonl").write_text(json.dumps(make_row("r1", "flex", "causal", "fwd", 1024)) + "\n")
    assert load_run(folder).rows["method"].tolist() == ["sdpa", "sdpa"]


def test_jsonl_skips_a_truncated_line_and_keeps_the_latest_row_of_a_case(tmp_path):
    first = make_row("r1", "sdpa", "causal", "fwd", 1024, "crashed", reason="worker died")
    again = make_row("r1", "sdpa", "causal", "fwd", 1024)
    other = make_row("r1", "sdpa", "causal", "fwd", 2048)
    folder = tmp_path / "r1"
    folder.mkdir()
    text = "\n".join(json.dumps(r) for r in (first, other, again)) + "\n" + json.dumps(other)[:40]
    (folder / "rows.jsonl").write_text(text)
    run = load_run(folder)
    assert len(run.rows) == 2
    latest = run.rows[run.rows["seq_kv"] == 1024].iloc[0]
    assert latest["status"] == "ok"
    assert run.warnings and "rows.jsonl:4" in run.warnings[0]


def test_csv_only_folder_loads_typed(tmp_path):
    run = load_run(write_run(tmp_path, "r1", rows_for("r1"), formats=("csv",)))
    assert run.rows["exact"].tolist() == [True] * 3
    assert run.rows["ms_median"].notna().all()
    assert str(run.rows["heads_q"].dtype) == "Int64"


def test_folder_without_rows_or_env_loads_empty(tmp_path):
    folder = tmp_path / "r1"
    folder.mkdir()
    (folder / "config.yaml").write_text("methods: [sdpa]\n")
    run = load_run(folder)
    assert len(run.rows) == 0 and list(run.rows.columns) == list(COLUMNS)
    assert run.env == {} and run.device == "not recorded"


def test_missing_folder_and_corrupt_env_raise_naming_the_path(tmp_path):
    with pytest.raises(RunDirError, match="run folder not found"):
        load_run(tmp_path / "nope")
    folder = write_run(tmp_path, "r1", rows_for("r1"))
    (folder / "env.json").write_text("{not json")
    with pytest.raises(RunDirError, match="env.json"):
        load_run(folder)


def test_run_id_is_filled_from_the_folder_name(tmp_path):
    rows = rows_for("r1")
    for row in rows:
        row["run_id"] = None
    assert set(load_run(write_run(tmp_path, "folder-name", rows)).rows["run_id"]) == {"folder-name"}


@pytest.mark.parametrize("devices, expected", [
    ((H200, "NVIDIA B200"), [H200, "NVIDIA B200"]),
    ((H200, H200), ["a", "b"]),
])
def test_merge_labels_sources_by_device_or_run(tmp_path, devices, expected):
    runs = [load_run(write_run(tmp_path, name, rows_for(name, device=device), env_for(name, device)))
            for name, device in zip(("a", "b"), devices)]
    merged = merge_runs(runs)
    assert len(merged) == 6
    assert merged.groupby("run_dir")["source"].first().tolist() == expected


def test_merge_of_one_run_has_no_source_label_and_fills_devices(tmp_path):
    rows = rows_for("a", device=None)
    merged = merge_runs([load_run(write_run(tmp_path, "a", rows, env_for("a", "NVIDIA B200")))])
    assert set(merged["source"]) == {""}
    assert set(merged["device"]) == {"NVIDIA B200"}


def test_merge_refuses_the_same_run_twice(tmp_path):
    run = load_run(write_run(tmp_path, "a", rows_for("a")))
    with pytest.raises(RunDirError, match="twice"):
        merge_runs([run, run])
