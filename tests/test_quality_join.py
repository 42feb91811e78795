"""Task quality joined to the same method's kernel rows (report), and quality rows in `attnbench compare`."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from attnbench.record.quality import to_frame
from attnbench.report.document import main as report_main
from tests.runfixtures import env_for, make_row, model_ms, write_run

KERNEL_METHODS = ("sdpa", "flex", "linear_attn")


def full_ms(method: str, length: int) -> float:
    """The fixture's full-mask fwd_bwd time: twice the causal one, so a join to the wrong mask is visible."""
    return 2 * model_ms(method, length, "fwd_bwd")


def write_kernel_run(root, run_id="kern", modes=("fwd", "fwd_bwd")):
    rows = []
    for mask in ("causal", "full"):
        for mode in modes:
            for length in (1024, 2048):
                for method in KERNEL_METHODS:
                    ms = full_ms(method, length) if mask == "full" and mode == "fwd_bwd" else None
                    rows.append(make_row(run_id, method, mask, mode, length, ms=ms))
    return write_run(root, run_id, rows, env_for(run_id))


def quality_row(task, pattern, method, seq, seed, value, status="ok", metric="accuracy", higher=True, **extra):
    row = {"run_id": "q", "case_id": f"{task}|{method}|{seq}|{seed}", "kind": "train", "method": method,
           "task": task, "pattern": pattern, "seq": seq, "seq_q": seq, "seq_kv": seq, "seed": seed,
           "metric": metric, "higher_is_better": higher, "value": value if status == "ok" else None,
           "status": status, "reason": None if status == "ok" else f"{status} in fixture", "tokens_per_s": 1e5,
           "device": "NVIDIA H200"}
    row.update(extra)
    return row


# mean metric per (task, method) at the longest length, 1024
MQAR = {"sdpa": 0.8, "flex": 0.7, "linear_attn": 0.99, "eager": 0.9}
DIGITS = {"sdpa": 0.5, "flex": 0.6, "linear_attn": 0.4}


def write_quality_run(root, run_id="q", rows=None):
    if rows is None:
        rows = []
        for seed in (0, 1):
            for method, value in MQAR.items():
                rows.append(quality_row("mqar", "causal_self", method, 512, seed, 0.1))  # shorter: not joined
                rows.append(quality_row("mqar", "causal_self", method, 1024, seed, value + (0.01 if seed else -0.01)))
            for method, value in DIGITS.items():
                rows.append(quality_row("digits", "noncausal_self", method, 1024, seed, value))
    folder = root / run_id
    folder.mkdir(parents=True, exist_ok=True)
    to_frame(rows).to_parquet(folder / "quality.parquet", index=False)
    return folder


def test_kernel_join_matches_method_mask_mode_and_the_tasks_own_length(tmp_path):
    from attnbench.record.rundir import load_runs
    from attnbench.report.context import build_context
    from attnbench.report.sections.quality import kernel_join, quality_rows

    runs = load_runs([str(write_quality_run(tmp_path)), str(write_kernel_run(tmp_path))], tmp_path)
    ctx = build_context(runs)
    joins = {j["task"]: j for j in kernel_join(quality_rows(ctx), ctx.kernel)}
    assert set(joins) == {"mqar", "digits"}
    mqar, digits = joins["mqar"], joins["digits"]
    # 1024 is measured by the kernel run and is the task's length: preferred over the longer 2048
    assert (mqar["mask"], mqar["ref_len"], mqar["length"]) == ("causal", 1024, 1024)
    assert (digits["mask"], digits["ref_len"]) == ("full", 1024)
    points = {p["method"]: p for p in mqar["points"]}
    for method in KERNEL_METHODS:
        assert points[method]["ms"] == pytest.approx(model_ms(method, 1024, "fwd_bwd"))
        assert points[method]["value"] == pytest.approx(MQAR[method])
    assert math.isnan(points["eager"]["ms"]) and "no ok fwd_bwd causal kernel row" in points["eager"]["note"]
    # sdpa fastest; flex slower and worse (dominated); linear_attn slowest but best
    assert {m for m, p in points.items() if p["on_front"]} == {"sdpa", "linear_attn"}
    digit_points = {p["method"]: p for p in digits["points"]}
    assert digit_points["flex"]["ms"] == pytest.approx(full_ms("flex", 1024))  # the full mask's rows, not causal
    assert {m for m, p in digit_points.items() if p["on_front"]} == {"sdpa", "flex"}


def test_kernel_join_takes_the_length_most_methods_measured_and_notes_a_method_measured_only_elsewhere(tmp_path):
    """A method with ok rows only at lengths the others lack (a 2-D method at square lengths) once emptied the
    join of its whole task (the lengths every method measured had no common element); now the join is at the
    length most of the task's methods measured and that method alone is noted."""
    from attnbench.record.rundir import load_runs
    from attnbench.report.context import build_context
    from attnbench.report.sections.quality import kernel_join, quality_rows

    rows = [quality_row("digits", "noncausal_self", m, 1024, 0, v) for m, v in {**DIGITS, "grid2d": 0.9}.items()]
    kernel = [make_row("k", m, "full", "fwd_bwd", n, ms=full_ms(m, n)) for m in KERNEL_METHODS for n in (1024, 2048)]
    kernel.append(make_row("k", "grid2d", "full", "fwd_bwd", 4096, ms=1.0))  # only at a length the others lack
    kernel.append(make_row("k", "flex", "full", "fwd_bwd", 512, status="wrong"))  # not ok: never a join length
    runs = load_runs([str(write_quality_run(tmp_path, "q2", rows)), str(write_run(tmp_path, "k", kernel,
                                                                                  env_for("k")))], tmp_path)
    ctx = build_context(runs)
    (join,) = kernel_join(quality_rows(ctx), ctx.kernel)
    assert (join["task"], join["mask"], join["ref_len"]) == ("digits", "full", 1024)  # 3 methods; the task's length
    points = {p["method"]: p for p in join["points"]}
    assert points["sdpa"]["ms"] == pytest.approx(full_ms("sdpa", 1024))
    assert math.isnan(points["grid2d"]["ms"]) and "no ok fwd_bwd full kernel row" in points["grid2d"]["note"]


def test_kernel_join_needs_fwd_bwd_rows_and_a_lower_is_better_metric_flips_the_front(tmp_path):
    from attnbench.record.rundir import load_runs
    from attnbench.report.context import build_context
    from attnbench.report.sections.quality import kernel_join, quality_rows

    runs = load_runs([str(write_quality_run(tmp_path)), str(write_kernel_run(tmp_path, modes=("fwd",)))], tmp_path)
    ctx = build_context(runs)
    assert kernel_join(quality_rows(ctx), ctx.kernel) == []  # fwd-only kernel rows are not a training cost
    rows = [quality_row("char_lm", "causal_self", m, 1024, 0, v, metric="bpc", higher=False)
            for m, v in {"sdpa": 2.0, "flex": 1.5, "linear_attn": 3.0}.items()]
    runs = load_runs([str(write_quality_run(tmp_path, "lm", rows)), str(write_kernel_run(tmp_path, "k2"))], tmp_path)
    ctx = build_context(runs)
    (join,) = kernel_join(quality_rows(ctx), ctx.kernel)
    assert {p["method"] for p in join["points"] if p["on_front"]} == {"sdpa", "flex"}  # linear: slower and worse


def test_report_cli_plots_quality_against_kernel_time(tmp_path):
    quality, kernel = write_quality_run(tmp_path), write_kernel_run(tmp_path)
    out = tmp_path / "out"
    assert report_main([str(quality), str(kernel), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    section = text[text.index("## Task quality"):]
    lines = [line for line in section.splitlines() if line.startswith("| mqar |") and "fwd_bwd" in line]
    assert len(lines) == len(MQAR)
    linear = next(line for line in lines if "| linear_attn |" in line)
    assert "causal · fwd_bwd" in linear and "1k" in linear and linear.rstrip().endswith("| yes |")
    assert "no kernel row" in next(line for line in lines if "| eager |" in line)
    assert any(out.glob("report_files/quality-kernel-pareto-*.png"))
    # the quality run alone: no kernel rows, no join (and no error)
    assert report_main([str(quality), "--out", str(tmp_path / "alone")]) == 0
    assert "kernel time per call" not in (tmp_path / "alone" / "report.md").read_text()


def test_compare_quality_signs_the_difference_by_direction_and_flags_regressions():
    from attnbench.report.compare_quality import compare_quality

    base = to_frame([quality_row("mqar", "causal_self", "sdpa", 256, 0, 0.95),
                     quality_row("mqar", "causal_self", "flex", 256, 0, 0.90),
                     quality_row("char_lm", "causal_self", "sdpa", 256, 0, 2.00, metric="bpc", higher=False),
                     quality_row("char_lm", "causal_self", "flex", 256, 0, 2.00, metric="bpc", higher=False),
                     quality_row("mqar", "causal_self", "lin", 256, 0, 0.5),
                     quality_row("mqar", "causal_self", "lin", 256, 1, None, status="diverged"),
                     quality_row("mqar", "causal_self", "gone", 256, 0, 0.5)])
    new = to_frame([quality_row("mqar", "causal_self", "sdpa", 256, 0, 0.80),  # accuracy down 0.15: regression
                    quality_row("mqar", "causal_self", "flex", 256, 0, 0.905),  # within the threshold
                    quality_row("char_lm", "causal_self", "sdpa", 256, 0, 2.5, metric="bpc", higher=False),  # worse
                    quality_row("char_lm", "causal_self", "flex", 256, 0, 1.5, metric="bpc", higher=False),  # better
                    quality_row("mqar", "causal_self", "lin", 256, 0, None, status="oom"),
                    quality_row("mqar", "causal_self", "lin", 256, 1, 0.6),
                    quality_row("mqar", "causal_self", "added", 256, 0, 0.5)])
    result = compare_quality(base, new, threshold=0.01)
    verdicts = {(r.task, r.method, r.seed): r.verdict for r in result.itertuples()}
    assert verdicts == {
        ("mqar", "sdpa", 0): "regression", ("mqar", "flex", 0): "unchanged",
        ("char_lm", "sdpa", 0): "regression", ("char_lm", "flex", 0): "improvement",
        ("mqar", "lin", 0): "new failure", ("mqar", "lin", 1): "fixed",
        ("mqar", "gone", 0): "only in BASE", ("mqar", "added", 0): "only in NEW"}
    rows = {(r.task, r.method, r.seed): r for r in result.itertuples()}
    assert rows[("char_lm", "sdpa", 0)].diff == pytest.approx(0.5)  # NEW - BASE in the metric's unit
    assert rows[("char_lm", "sdpa", 0)].gain == pytest.approx(-0.5)  # lower bpc is better: a loss
    assert result["verdict"].iloc[0] == "regression" and result["gain"].iloc[0] == pytest.approx(-0.5)  # worst first
    # a threshold larger than every change: no metric regression left, the failure stays one
    loose = compare_quality(base, new, threshold=1.0)
    assert set(loose.loc[loose["verdict"].isin(["regression", "new failure"]), "method"]) == {"lin"}
    changed = to_frame([quality_row("mqar", "causal_self", "sdpa", 256, 0, 0.4, metric="loss", higher=False)])
    assert compare_quality(base, changed)["verdict"].iloc[0] == "metric changed"


def test_compare_cli_reads_quality_rows_and_fails_on_a_quality_regression(tmp_path, capsys):
    from attnbench.report.compare import main as compare_main

    base = write_quality_run(tmp_path, "base")
    same = write_quality_run(tmp_path, "same")
    assert compare_main([str(base), str(same), "--fail-on-regression"]) == 0
    assert "quality regressions: 0" in capsys.readouterr().out
    worse = [quality_row("mqar", "causal_self", m, 1024, s, v - 0.2) for s in (0, 1) for m, v in MQAR.items()]
    new = write_quality_run(tmp_path, "worse", worse)
    assert compare_main([str(base), str(new), "--fail-on-regression"]) == 1
    out = capsys.readouterr().out
    assert f"quality regressions: {len(worse)}" in out
    frame = pd.read_csv(new / "compare_quality.csv")
    assert (frame["verdict"] == "regression").sum() == len(worse)
    assert "## Quality rows" in (new / "compare.md").read_text()
    # a looser threshold lets the same drop pass; the cases only in BASE are never regressions
    assert compare_main([str(base), str(new), "--fail-on-regression", "--quality-threshold", "0.3"]) == 0
    assert compare_main([str(base), str(new), "--quality-threshold", "-1"]) == 2
    # kernel rows and quality rows in both runs: both compared, one exit status
    kernel_base, kernel_new = write_kernel_run(tmp_path, "kb"), write_kernel_run(tmp_path, "kn")
    write_quality_run(tmp_path, "kb"), write_quality_run(tmp_path, "kn", worse)
    capsys.readouterr()
    assert compare_main([str(kernel_base), str(kernel_new), "--fail-on-regression"]) == 1
    out = capsys.readouterr().out
    assert "regressions: 0" in out and f"quality regressions: {len(worse)}" in out
    assert (kernel_new / "compare.csv").is_file() and (kernel_new / "compare_quality.csv").is_file()
    # kernel rows on one side, quality rows on the other: a usage error, not an empty comparison
    assert compare_main([str(write_kernel_run(tmp_path, "k3")), str(base)]) == 2
