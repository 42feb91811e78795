"""The report shows the analysis experiments (issue 14): experiment rows with their checks (a failed check is
shown and counted), the ICL mechanism / MQAR state / RF tables, and trained rows with host-model options kept
apart from the plain model with their change against it (the hybrid rescue)."""
from __future__ import annotations

import json

from attnbench.report.document import main as report_main
from tests.test_quality_join import quality_row, write_quality_run

ICL_CHECKS = {"kq_offdiag_ratio<0.05": True, "ov_last_entry_ratio<0.05": True, "zero_sum_ratio<0.05": False,
              "closed_form_r2>0.99": True, "multihead_beats_single": True, "degrades_less_than_linear": True}


def _experiment(task, method, value, breakdown, extras, metric="mse", higher=False, **kw):
    return quality_row(task, "causal_self", method, 32, 0, value, metric=metric, higher=higher, kind="experiment",
                       breakdown=json.dumps(breakdown), extras=json.dumps(extras), **kw)


def _rows():
    mech = {"kq_offdiag_ratio": 0.0123, "ov_last_entry_ratio": 0.0234, "zero_sum_ratio": 0.456,
            "closed_form_r2": 0.99871, "omega": [1.0], "mu": [0.5, -0.5]}
    rows = [
        _experiment("icl_linreg_1layer_mh", "sdpa", 0.0711, {"mse@1x": 0.0711, "mse@4x": 0.0988},
                    {"checks": ICL_CHECKS, "mechanism": mech, "ridge_mse": 0.0555}),
        _experiment("mqar_state_sweep", "linear_attn", 0.61, {"n=4": 0.21, "n=16": 0.44, "n=64": 0.61},
                    {"state": {f"n={n}": {"linear_state_per_layer": 2 * n * 64, "kv_cache_per_layer": 2 * 128 * (n + 64),
                                          "layers": 2} for n in (4, 16, 64)},
                     "checks": {"accuracy_not_worse_with_more_state": True}}, metric="accuracy", higher=True,
                    exact=False),
        _experiment("mqar_state_sweep", "performer", 0.33, {"n=4": 0.11, "n=16": 0.22, "n=64": 0.33},
                    {"state": {f"n={n}": {"state_per_layer": 777 * n, "state_source": "decode",
                                          "linear_state_per_layer": 2 * n * 64, "layers": 2} for n in (4, 16, 64)},
                     "checks": {"accuracy_not_worse_with_more_state": True}}, metric="accuracy", higher=True,
                    exact=False),
        _experiment("mqar_state_sweep", "lla", 0.05, {"n=4": 0.04, "n=16": 0.045, "n=64": 0.05},
                    {"state": {f"n={n}": {"state_per_layer": None, "linear_state_per_layer": 2 * n * 64,
                                          "state_source": "undeclared: the method declares no recurrent decode"}
                               for n in (4, 16, 64)},
                     "checks": {"accuracy_not_worse_with_more_state": True}}, metric="accuracy", higher=True,
                    exact=False),
        _experiment("rf_attention_probe", "sdpa", 0.31,
                    {"quadratic/rfa/n=256": 0.52, "quadratic/rfmlp/n=256": 0.77, "quadratic/rfa/n=1024": 0.31,
                     "quadratic/rfmlp/n=1024": 0.66},
                    {"checks": {"key_permutation_invariant": True, "rfa_below_rfmlp[quadratic]": True},
                     "permutation_rel_err": 3e-7}),
        _experiment("icl_linreg_1layer_mh", "taylor_softmax", None, {}, {}, status="timeout"),
        _experiment("sparse_gin_minilm", "sdpa", 0.833, {},
                    {"frozen_recall": 0.917, "train_recall": 1.0, "edges_per_layer_sentence": 1.0,
                     "self_loop_share": 1.0, "checks": {"lambda0_is_base": True, "messages_cross_tokens": False,
                                                        "not_worse_than_frozen": False}}, metric="recall", higher=True),
    ]
    for seed, (plain, hybrid) in enumerate([(0.30, 0.85), (0.32, 0.87)]):
        rows.append(quality_row("mqar", "causal_self", "decon_mlp", 128, seed, plain))
        rows.append(quality_row("mqar", "causal_self", "decon_mlp", 128, seed, hybrid,
                                model_options=json.dumps({"hybrid_schedule": "first"})))
        rows.append(quality_row("mqar", "causal_self", "sdpa", 128, seed, 0.99, exact=True))
    return rows


def _report(tmp_path, rows):
    out = tmp_path / "out"
    assert report_main([str(write_quality_run(tmp_path, "ana", rows)), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    return text[text.index("## Task quality"):]


def _line(section, *needles):
    found = [line for line in section.splitlines() if all(n in line for n in needles)]
    assert found, needles
    return found[0]


def test_experiment_rows_and_their_checks_are_rendered(tmp_path):
    section = _report(tmp_path, _rows())
    summary = _line(section, "| icl_linreg_1layer_mh |", "| sdpa |", "| mse |")
    assert "0.0711" in summary and "5/6" in summary and "zero_sum_ratio<0.05" in summary  # the failed check named
    assert "timeout" in _line(section, "| icl_linreg_1layer_mh |", "taylor_softmax")
    icl = _line(section, "| sdpa |", "0.0123")  # the mechanism table
    assert "✓ 0.0123" in icl and "✗ 0.456" in icl and "✓ 0.9987" in icl and "0.0988 (4x)" in icl and "0.0555" in icl
    mqar = _line(section, "| linear_attn |", "0.21", "0.44")
    # a row from before the measured figure: the nominal size, said to be nominal
    assert "| 0.21 | 0.44 | 0.61 | 8192 (nominal heads·n·d_v) |" in mqar.replace(",", "")  # n = 4, 16, 64 in order
    # the measured state of the method (not heads·n·d_v = 8192), and no figure where the method declares none
    assert "| 0.11 | 0.22 | 0.33 | 49728 (measured) |" in _line(section, "| performer |", "0.11").replace(",", "")
    lla = _line(section, "| lla |", "0.045")
    assert "| — |" in lla and "8192" not in lla.replace(",", "")
    rf = _line(section, "| quadratic |", "below rfmlp")
    assert "0.52" in rf and "0.31" in rf and "✓" in rf
    assert "0.66" in _line(section, "| quadratic |", "| rfmlp |")
    gin = _line(section, "| sdpa |", "0.833", "0.917")
    assert "| ✓ | ✗ |" in gin  # the released self-loop graph shows as no cross-token messages
    assert "1/3" in _line(section, "| sparse_gin_minilm |", "| recall |")


def test_model_options_are_kept_apart_and_compared_with_the_plain_model(tmp_path):
    section = _report(tmp_path, _rows())
    rank = _line(section, "| decon_mlp [hybrid_schedule=first] |")
    assert "0.86" in rank  # the mean of the hybrid runs alone, not merged with the plain model's 0.31
    assert "0.31" in _line(section, "| decon_mlp |", "(#")
    change = _line(section, "| mqar |", "| decon_mlp |", "hybrid_schedule=first")
    assert "| 0.31 [0.3–0.32] (2/2) | 0.86 [0.85–0.87] (2/2) | +0.55 |" in change
    assert "sdpa 0.99" in section  # exact attention on the plain model, for reference
    # negative control: without a plain run there is no change to show
    rows = [r for r in _rows() if not (r["method"] == "decon_mlp" and not r.get("model_options"))]
    assert "| no plain run |" in _line(_report(tmp_path / "b", rows), "| decon_mlp | hybrid_schedule=first |")


def test_options_over_seeds_show_the_median_its_range_and_the_failures(tmp_path):
    """The hybrid rescue over three seeds (as in results/h200-analysis-hybrid-fp32): one seed stays near chance, so
    the cell is the median with the range, not the mean; a diverged seed is counted and named; a plain model whose
    every seed diverged shows that, not "no plain run"."""
    rows = []
    for seed, (plain, hybrid, fixed) in enumerate([(0.04, 0.969, None), (0.04, 0.067, 0.2), (0.037, 0.935, 0.3)]):
        rows.append(quality_row("mqar", "causal_self", "linear_attn", 128, seed, plain))
        rows.append(quality_row("mqar", "causal_self", "linear_attn", 128, seed, hybrid,
                                model_options=json.dumps({"hybrid_schedule": "first"})))
        rows.append(quality_row("mqar", "causal_self", "decon_nonapprox", 128, seed, None, status="diverged"))
        rows.append(quality_row("mqar", "causal_self", "decon_nonapprox", 128, seed, hybrid,
                                model_options=json.dumps({"hybrid_schedule": "first"})))
        rows.append(quality_row("mqar", "causal_self", "sdpa", 128, seed, fixed,
                                status="ok" if fixed is not None else "diverged",
                                model_options=json.dumps({"qk_source": "fixed_seq"})))
        rows.append(quality_row("mqar", "causal_self", "sdpa", 128, seed, 0.97, exact=True))
    section = _report(tmp_path, rows)
    rescue = _line(section, "| linear_attn | hybrid_schedule=first |")
    assert "| 0.04 [0.037–0.04] (3/3) | 0.935 [0.067–0.969] (3/3) | +0.895 |" in rescue
    assert "0.657" not in rescue  # negative control: the mean of 0.969, 0.067, 0.935
    assert "| diverged 3/3 |" in _line(section, "| decon_nonapprox | hybrid_schedule=first |")
    fixed = _line(section, "| sdpa | qk_source=fixed_seq |")
    assert "0.25 [0.2–0.3] (2/3)" in fixed
    assert "seed 0: diverged" in (tmp_path / "out" / "report.html").read_text()  # the failed seed, as the tip


def test_the_state_sweep_plot_draws_measured_states_only(tmp_path):
    _report(tmp_path / "with", _rows())  # performer has measured states
    assert (tmp_path / "with" / "out" / "report_files" / "mqar-state-sweep.png").is_file()
    text = (tmp_path / "with" / "out" / "report.md").read_text()
    assert "mqar-state-sweep.png" in text
    # control: only the nominal (old) and undeclared rows -> no figure drawn from a formula
    nominal = [r for r in _rows() if not (r["task"] == "mqar_state_sweep" and r["method"] == "performer")]
    _report(tmp_path / "without", nominal)
    assert not (tmp_path / "without" / "out" / "report_files" / "mqar-state-sweep.png").exists()


def test_a_probe_row_of_a_method_that_attended_every_pair_says_so(tmp_path):
    def probe(method, share, exact=False):
        extras = json.dumps({"attended_share": share}) if share is not None else ""
        return quality_row("planted_recall", "causal_self", method, 1024, 0, 1.0, metric="recall", kind="probe",
                           breakdown=json.dumps({"d=1": 1.0}), extras=extras, exact=exact)

    section = _report(tmp_path, [probe("biformer", 1.0), probe("routing", 0.25), probe("sdpa", None, exact=True)])
    assert "(dense here)" in _line(section, "| planted_recall |", "| biformer |")
    assert "(dense here)" not in _line(section, "| planted_recall |", "| routing |")  # control: sparse there
    assert "attended_share 0.25" in _line(section, "| planted_recall |", "| routing |")
    assert "(dense here)" not in _line(section, "| planted_recall |", "| sdpa |")


def test_the_state_sweep_gives_medians_over_seeds(tmp_path):
    """Three seeds of one method, one of them stuck at chance and one diverged: the seeds table shows the median
    of the finished seeds with their range and counts the diverged one; a run of one seed per method has no such
    table (nothing to summarise)."""
    def seed_row(seed, n32, status="ok"):
        return quality_row("mqar_state_sweep", "causal_self", "delta_rule", 32, seed, n32, metric="accuracy",
                           higher=True, kind="experiment", status=status,
                           breakdown=json.dumps({"n=4": 0.1, "n=32": n32} if n32 else {}), extras=json.dumps({}))

    rows = [seed_row(0, 0.13), seed_row(1, 0.97), seed_row(2, 0.98), seed_row(3, None, status="diverged")]
    section = _report(tmp_path / "seeds", rows)
    line = _line(section, "| delta_rule |", "[")
    assert "| 3/4 |" in line and "0.97 [0.13–0.98]" in line and "0.1 [0.1–0.1]" in line
    assert "median acc n=32 [min–max]" in section
    single = _report(tmp_path / "single", _rows())
    assert "median acc" not in single


def test_a_fitted_case_replaces_the_unsupported_row_of_its_default_sized_case(tmp_path):
    """A grid resumed with fit_method_options keeps the default-sized case's unsupported row beside the fitted
    case's row (a new case id): the report counts the fitted one only. Control: an unsupported row without a fitted
    case of the same key stays, and so does a default-sized row that ran."""
    too_big = "method_options.halo.block: must be <= seq 64, got 256 (the case is shorter than one block)"
    rows = [
        quality_row("mqar", "causal_self", "halo", 64, 0, None, status="unsupported", reason=too_big),
        quality_row("mqar", "causal_self", "halo", 64, 0, 0.77, case_id="mqar|halo|64|0|fit",
                    fitted_options=json.dumps({"block": 32, "halo": 16})),
        quality_row("mqar", "causal_self", "halo", 64, 1, None, status="unsupported", reason=too_big),
        quality_row("mqar", "causal_self", "sdpa", 64, 0, 0.9, exact=True),
        quality_row("mqar", "causal_self", "sdpa", 64, 1, 0.92, exact=True),
    ]
    section = _report(tmp_path, rows)
    # seed 0's default-sized row is replaced by its fitted case; seed 1 has no fitted case, so its row stays
    # (before the filter the cell read "0.77, unsupported ×2")
    assert "| halo | 0.77, unsupported ×1 |" in section


def test_superseded_by_fitted_keeps_rows_that_ran():
    import pandas as pd

    from attnbench.report.sections.quality import superseded_by_fitted

    base = {"run_dir": "r", "task": "mqar", "method": "halo", "seq": 64, "seed": 0, "dtype": "float32",
            "model_options": None, "tf32": False}
    frame = pd.DataFrame([{**base, "status": "ok", "fitted_options": None},
                          {**base, "status": "unsupported", "fitted_options": None},
                          {**base, "status": "ok", "fitted_options": '{"block": 32}'}])
    kept = superseded_by_fitted(frame)
    assert list(kept["status"]) == ["ok", "ok"]  # only the unsupported default-sized row goes


def test_methods_that_ran_nothing_of_a_pattern_leave_its_table_with_their_reasons():
    import pandas as pd

    from attnbench.report.sections.quality import split_unsupported, unsupported_note

    rows = pd.DataFrame([
        {"label": "flex", "status": "ok", "reason": ""},
        {"label": "halo", "status": "unsupported", "reason": "block too big"},
        {"label": "halo", "status": "ok", "reason": ""},  # ran once: keeps its line
        {"label": "simple_gla", "status": "unsupported", "reason": "causal masks only"},
        {"label": "delta_rule", "status": "unsupported", "reason": "causal masks only"},
        {"label": "flash_attn", "status": "unsupported", "reason": "not importable"},
        {"label": "routing", "status": "error", "reason": "boom"},  # failed, not unsupported: keeps its line
    ])
    kept, gone = split_unsupported(rows)
    assert sorted(set(kept["label"])) == ["flex", "halo", "routing"]
    assert gone == {"delta_rule": "causal masks only", "flash_attn": "not importable",
                    "simple_gla": "causal masks only"}
    note = unsupported_note(gone)
    assert "delta_rule, simple_gla (causal masks only)" in note and "flash_attn (not importable)" in note
    assert unsupported_note({}) == ""
