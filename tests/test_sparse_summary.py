"""scripts/sparse_summary.py: rate against the dense baseline, efficiency length, log-log slope, fidelity."""
from __future__ import annotations

import pandas as pd
import pytest

from scriptload import load_script


@pytest.fixture(scope="module")
def summary():
    return load_script("sparse_summary")


def frame():
    rows = []
    for seq in (4096, 16384, 65536):
        scale = seq / 4096
        rows += [  # baseline: quadratic; method: L^1.5 from a higher start, so it wins from 64K only
            dict(method="sdpa_cudnn", mask="causal", mode="fwd_bwd", seq_q=seq, ms_median=1.0 * scale ** 2, status="ok"),
            dict(method="sdpa_cudnn", mask="full", mode="fwd", seq_q=seq, ms_median=0.5 * scale ** 2, status="ok",
                 tflops=600.0),
            dict(method="routed", mask="causal", mode="fwd_bwd", seq_q=seq, ms_median=5.0 * scale ** 1.5, status="ok"),
            dict(method="routed", mask="causal", mode="fwd", seq_q=seq, ms_median=2.0 * scale ** 1.5, status="ok",
                 tflops_attended=300.0, approx_err=0.1 * scale, routing_share=0.25),
            dict(method="local", mask="full", mode="fwd_bwd", seq_q=seq, ms_median=3.0 * scale, status="ok"),
        ]
    rows.append(dict(method="routed", mask="causal", mode="fwd", seq_q=262144, ms_median=None, status="oom",
                     reason="CUDA out of memory"))
    rows.append(dict(method="routed", mask="causal", mode="fwd", seq_q=1024, seq_kv=4096, ms_median=99.0,
                     status="ok", tflops_attended=1.0))  # a cross row: not on the self-attention length axis
    frame = pd.DataFrame(rows)
    frame["seq_kv"] = frame.seq_kv.fillna(frame.seq_q)
    return frame


def test_slopes_are_measured_from_the_rows(summary):
    table = summary.slopes(frame()).set_index(["method", "mask", "mode"])
    assert table.loc[("routed", "causal", "fwd"), "slope"] == pytest.approx(1.5)
    assert table.loc[("sdpa_cudnn", "causal", "fwd_bwd"), "slope"] == pytest.approx(2.0)
    assert table.loc[("local", "full", "fwd_bwd"), "slope"] == pytest.approx(1.0)
    # the long-length slope fits >= 16K here: a flat overhead at 4K bends the all-length slope, not it
    bent = frame()
    bent.loc[(bent.method == "routed") & (bent.seq_q == 4096) & (bent["mode"] == "fwd"), "ms_median"] = 40.0
    table = summary.slopes(bent, long_fit=16384).set_index(["method", "mask", "mode"])
    assert table.loc[("routed", "causal", "fwd"), "slope_ge_16K"] == pytest.approx(1.5)
    assert table.loc[("routed", "causal", "fwd"), "slope"] < 1.2
    assert table.loc[("routed", "causal", "fwd"), "long_lengths"] == "16K, 64K"


def test_efficiency_length_is_the_first_length_that_beats_the_baseline(summary):
    table = summary.efficiency_lengths(frame(), "sdpa_cudnn").set_index("method")
    # routed 5, 40, 320 ms against the baseline's 1, 16, 256 ms: never below
    assert table.loc["routed", "efficiency_length"] == "none <= 64K"
    # local has no causal rows: compared on full, where the baseline has no fwd_bwd rows -> not listed
    assert "local" not in table.index
    faster = frame()
    faster.loc[faster.method == "routed", "ms_median"] /= 4
    table = summary.efficiency_lengths(faster, "sdpa_cudnn").set_index("method")
    assert table.loc["routed", "efficiency_length"] == "16K"  # 1.25 > 1 at 4K, 10 < 16 at 16K


def test_rate_is_a_share_of_the_dense_forward_and_fidelity_takes_the_longest_length(summary):
    table = summary.rates(frame(), "sdpa_cudnn")
    assert set(table.method) == {"routed"} and (table.of_dense == 0.5).all()
    fid = summary.fidelity(frame()).set_index("method")
    assert fid.loc["routed", "seq"] == 65536 and fid.loc["routed", "approx_err"] == pytest.approx(1.6)


def test_render_lists_every_section_and_the_failed_rows(summary):
    text = summary.render(frame())
    for title in ("## Rate", "## Efficiency length", "## Log-log slope", "## approx_err", "## Rows not ok"):
        assert title in text
    assert "CUDA out of memory" in text and "| routed | causal | 64K |" in text


def test_the_attention_part_leaves_the_routing_phase_out(summary):
    table = summary.rates(frame(), "sdpa_cudnn")
    # 300 TFLOP/s over the whole call with 25 % routing -> 400 over the attention part, 2/3 of the dense 600
    assert list(table.attention_part) == pytest.approx([400.0] * 3)
    assert list(table.part_of_dense) == pytest.approx([400 / 600] * 3)


def test_several_runs_read_as_one_with_methods_taken_from_one_run(summary):
    main = frame()
    impl = frame()
    impl = impl[impl.method == "local"].assign(ms_median=lambda f: f.ms_median / 2)
    both = summary.combine({"main": main, "impl": impl}, {"local": "impl"})
    local = both[both.method == "local"]
    assert set(local.source) == {"impl"} and len(local) == len(impl)  # main's local rows dropped
    assert set(both[both.method == "routed"].source) == {"main"}
    with pytest.raises(SystemExit, match="has no row of routed"):
        summary.combine({"main": main, "impl": impl}, {"routed": "impl"})


def test_a_method_from_several_runs_takes_each_case_from_the_later_run(summary):
    """--from old=m --from new=m: the new run's rows win where both hold a case, the old run's rows fill the
    lengths the new run lacks; the negative control (one --from) loses the old lengths."""
    old = frame()
    new = old[(old.method == "routed") & (old.seq_q >= 16384) & (old.seq_q == old.seq_kv)]
    new = new.assign(ms_median=new.ms_median / 4)
    both = summary.combine({"main": frame(), "old": old, "new": new}, {"routed": ["old", "new"]})
    routed = both[both.method == "routed"]
    assert set(routed[routed.seq_q == 4096].source) == {"old"}  # only the old run measured 4K
    assert set(routed[routed.seq_q >= 16384].source) == {"new"}  # the new run's rows shadow the old ones
    assert len(routed) == len(old[old.method == "routed"])  # one row per case: none duplicated
    assert "main" not in set(routed.source)  # a run not named for the method gives none of its rows
    only_new = summary.combine({"main": frame(), "old": old, "new": new}, {"routed": "new"})
    assert 4096 not in set(only_new[only_new.method == "routed"].seq_q)


def test_the_grid_lists_exactly_the_cells_without_any_row(summary):
    rows = frame()
    missing = summary.missing_cells(rows, [4096, 262144])
    cells = set(zip(missing.method, missing["mask"], missing.seq, missing["mode"]))
    assert ("routed", "causal", 262144, "fwd") not in cells  # its oom row says why not
    assert ("routed", "causal", 262144, "fwd_bwd") in cells and ("routed", "causal", 4096, "fwd") not in cells
    assert len(missing) == 3 * 2 * 2 * 2 - len(set(zip(rows.method, rows["mask"], rows.seq_q, rows["mode"]))
                                               & {(m, k, s, o) for m in set(rows.method) for k in ("full", "causal")
                                                  for s in (4096, 262144) for o in ("fwd", "fwd_bwd")})


def test_grid_coverage_counts_rows_of_the_runs_a_from_drops(summary, tmp_path, capsys):
    """--from RUN=m keeps m's rows of RUN only for the tables, but a cell another run has a row for (an
    ``unsupported`` row saying why) is covered; without that union (negative control) it would be listed."""
    main = frame()
    impl = main[(main.method == "local") & (main.seq_q == 4096)].copy()  # the impl run: 4K only
    for name, rows in (("main", main), ("impl", impl)):
        (tmp_path / name).mkdir()
        rows.to_json(tmp_path / name / "rows.jsonl", orient="records", lines=True)
    argv = [str(tmp_path / "main"), str(tmp_path / "impl"), "--from", f"{tmp_path / 'impl'}=local",
            "--grid", "4096,65536"]
    assert summary.main(argv) == 0
    out = capsys.readouterr().out
    grid = out.split("## Grid cells without a row")[1].split("##")[0]
    assert "| local | full | 64K | fwd_bwd |" not in grid  # the main run's 64K row covers it
    assert "| local | full | 64K | fwd |" in grid  # no run has that one
    taken = summary.combine({"main": main, "impl": impl}, {"local": "impl"})
    dropped = summary.missing_cells(taken, [4096, 65536])
    assert ((dropped.method == "local") & (dropped.seq == 65536) & (dropped["mode"] == "fwd_bwd")).any()


def test_a_row_of_another_code_path_is_a_line_of_its_own(summary, tmp_path, capsys):
    """A run whose rows set query_order: sorted (VARIANTS) gives the line ``routed [query_order=sorted]``: its
    cases do not shadow the other code path's (the natural-order rows keep every length), and the grid counts it
    under its method. Negative control: without the variant column the later run's rows would replace them."""
    old = frame()
    new = old[(old.method == "routed") & (old.seq_q >= 16384) & (old.seq_q == old.seq_kv)]
    new = new.assign(ms_median=new.ms_median / 4, method_options='{"query_order": "sorted"}')
    for name, rows in (("old", old), ("new", new)):
        (tmp_path / name).mkdir()
        rows.to_json(tmp_path / name / "rows.jsonl", orient="records", lines=True)
    frames = {name: summary.with_variants(summary.load(tmp_path / name)) for name in ("old", "new")}
    both = summary.combine(frames, {"routed": ["old", "new"]})
    assert len(both[both.method == "routed"]) == len(old[old.method == "routed"])  # nothing shadowed
    assert len(both[both.method == "routed [query_order=sorted]"]) == len(new)
    assert set(both[both.method == "routed [query_order=sorted]"].source) == {"new"}
    plain = summary.combine({k: f.drop(columns="variant") for k, f in frames.items()}, {"routed": ["old", "new"]})
    assert set(plain[(plain.method == "routed") & (plain.seq_q >= 16384)].source) == {"new"}  # the control
    argv = [str(tmp_path / "old"), str(tmp_path / "new"), "--from", f"{tmp_path / 'old'}=routed",
            "--from", f"{tmp_path / 'new'}=routed", "--grid", "4096"]
    assert summary.main(argv) == 0
    out = capsys.readouterr().out
    assert "| routed [query_order=sorted] | causal | fwd |" in out  # its own slope line
    assert "of 12: methods" in out  # three methods (sdpa_cudnn, routed, local) x 2 masks x 1 length x 2 modes
