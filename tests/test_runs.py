"""`attnbench runs`: run folders with date, device and case counts by status."""
from runfixtures import env_for, fixture_rows, write_run

from attnbench.record import runs as runs


def small(run_id, device="NVIDIA H200"):
    return fixture_rows(run_id, device, cp=False, masks=("full",), modes=("fwd",))


def test_lists_runs_newest_first_with_counts(tmp_path, capsys):
    write_run(tmp_path, "old", small("old"), env_for("old", started_at="2025-01-01T00:00:00Z"))
    write_run(tmp_path, "new", small("new", "NVIDIA B200"),
              env_for("new", "NVIDIA B200", started_at="2025-03-01T00:00:00Z"))
    (tmp_path / "not-a-run").mkdir()
    assert runs.main(["--results-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "date", "device", "rows", "ok", "wrong", "oom", "error", "note"]
    assert lines[1].split()[:2] == ["new", "2025-03-01T00:00:00Z"]
    assert "NVIDIA B200" in lines[1] and "NVIDIA H200" in lines[2]
    # full mask, fwd: 5 methods x 5 lengths = 18 ok, 5 wrong (buggy), 1 oom (eager 16k), 1 error (flex 16k)
    counts = {r["run"]: r for r in runs.run_summaries(tmp_path)}
    assert (counts["old"]["rows"], counts["old"]["ok"], counts["old"]["wrong"], counts["old"]["oom"],
            counts["old"]["error"]) == (25, 18, 5, 1, 1)
    assert len(lines) == 3


def test_folders_without_env_or_with_broken_files_are_listed_not_fatal(tmp_path, capsys):
    write_run(tmp_path, "no-env", small("no-env"))
    broken = write_run(tmp_path, "broken", small("broken"), env_for("broken"))
    (broken / "env.json").write_text("{")
    assert runs.main(["--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    no_env = next(line for line in out.splitlines() if line.startswith("no-env"))
    assert "(mtime)" in no_env and "NVIDIA H200" in no_env  # device from the rows
    assert "cannot read" in next(line for line in out.splitlines() if line.startswith("broken"))


def test_empty_and_missing_results_dir(tmp_path, capsys):
    assert runs.main(["--results-dir", str(tmp_path)]) == 0
    assert "no runs in" in capsys.readouterr().out
    assert runs.main(["--results-dir", str(tmp_path / "missing")]) == 2
    assert "--results-dir" in capsys.readouterr().err
