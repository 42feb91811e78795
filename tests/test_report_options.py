"""Runs compared as one (`attnbench report --one-source`): one run per implementation of a method, labelled
by the method options its rows were measured with."""
from __future__ import annotations

import json

import yaml

from attnbench.record.rundir import load_run
from attnbench.report.context import build_context, options_text
from attnbench.report.document import main as report_main
from runfixtures import env_for, make_row, write_run

LENGTHS = (4096, 16384)


def _impl_run(root, run_id, impl, ms, column=True):
    rows = []
    for length in LENGTHS:
        row = make_row(run_id, "halo", "causal", "fwd", length, ms=ms * length / 4096, invocation=0)
        if column:
            row["method_options"] = json.dumps({"block": 256, "impl": impl}, sort_keys=True)
        rows.append(row)
    folder = write_run(root, run_id, rows, env=env_for(run_id))
    (folder / "config.0.yaml").write_text(yaml.safe_dump({"method_options": {"halo": {"block": 256, "impl": impl}}}))
    return folder


def test_one_source_labels_a_method_by_its_options_in_one_table(tmp_path):
    a = _impl_run(tmp_path, "impl-gather", "gather", 2.0)
    b = _impl_run(tmp_path, "impl-strided", "strided", 1.0, column=False)  # legacy rows: options from config.0.yaml
    runs = [load_run(a), load_run(b)]
    ctx = build_context(runs, one_source=True)
    assert set(ctx.kernel["label"]) == {"halo [impl=gather]", "halo [impl=strided]"}  # only what differs
    assert set(ctx.kernel["source"]) == {""}  # one comparison: no per-run tables
    assert ctx.kernel["group"].nunique() == 1
    # without the flag: one table per run (the runs are sources), and the labels still tell the options apart
    apart = build_context(runs)
    assert set(apart.kernel["source"]) == {"impl-gather", "impl-strided"}
    assert all(label.startswith("halo [impl=") for label in apart.kernel["label"])
    out = tmp_path / "both"
    assert report_main([str(a), str(b), "--one-source", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "halo [impl=gather]" in text and "halo [impl=strided]" in text


def test_a_method_with_one_set_of_options_keeps_its_plain_label(tmp_path):
    """Negative control: labels change only where the options differ."""
    a = _impl_run(tmp_path, "run-a", "strided", 2.0)
    b = _impl_run(tmp_path, "run-b", "strided", 1.0, column=False)
    ctx = build_context([load_run(a), load_run(b)], one_source=True)
    assert set(ctx.kernel["label"]) == {"halo"}


def test_options_text():
    assert options_text(json.dumps({"impl": "flex", "chunk": 64})) == "chunk=64, impl=flex"
    assert options_text(None) == "" and options_text("") == ""


def test_a_row_whose_auto_default_ran_a_path_shares_the_label_of_the_row_that_asked_for_it(tmp_path):
    """resolved_options (the path an `auto` default chose) overlays method_options: a default row that ran
    impl=strided is labelled as the row that asked for it; a row that resolved to gather stays apart."""
    a = _impl_run(tmp_path, "asked", "strided", 2.0)
    rows = [make_row("auto", "halo", "causal", "fwd", length, ms=1.0, invocation=0) for length in LENGTHS]
    for row in rows:
        row["resolved_options"] = json.dumps({"block": 256, "impl": "strided"})
    rows[1]["resolved_options"] = json.dumps({"block": 256, "impl": "gather"})
    b = write_run(tmp_path, "auto", rows, env=env_for("auto"))
    ctx = build_context([load_run(a), load_run(b)], one_source=True)
    labels = dict(zip(zip(ctx.kernel["source"], ctx.kernel["x"], ctx.kernel["ms_median"]), ctx.kernel["label"]))
    assert set(ctx.kernel["label"]) == {"halo [impl=strided]", "halo [impl=gather]"}
    assert sum(label == "halo [impl=strided]" for label in labels.values()) == 3
