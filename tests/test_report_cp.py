"""The context-parallel section of `attnbench report`: present only with CP rows, scaling figures recomputed and
checked against an independent formula, impossible speed-ups flagged, the layout x mask matrix with reasons."""
from __future__ import annotations

import math

import pytest

from attnbench.record.rundir import load_run
from attnbench.report import document as report
from attnbench.report.model import Cell, Plot, Table, Text
from attnbench.report.sections import cp as cp_section
from runfixtures import cp_rows, env_for, fixture_rows, write_run

NUMBERS = "Every context-parallel case"


def build(tmp_path, rows, name="cp"):
    folder = write_run(tmp_path, name, rows, env_for(name))
    return {s.anchor: s for s in report.build_report([load_run(folder)], None)}, folder


def text_of(cell):
    return cell.text if isinstance(cell, Cell) else cell


def table(section, caption_part):
    found = [b for b in section.blocks if isinstance(b, Table) and caption_part in b.caption]
    assert len(found) == 1, caption_part
    return found[0]


def expected_strong(rows):
    """{(layout, mask, length, world): (speed-up, efficiency)} from the fixture's dict rows, independently of the
    report: the one-device ok row of the same case, its time over the CP time, over the world size."""
    single = {(r["mask"], r["seq_kv"], r["mode"]): r["ms_median"] for r in rows
              if r["layout"] == "single" and r["status"] == "ok"}
    out = {}
    for r in rows:
        if r["layout"] != "single" and r["status"] == "ok":
            speedup = single[(r["mask"], r["seq_kv"], r["mode"])] / r["ms_median"]
            out[(r["layout"], r["mask"], r["seq_kv"], r["world_size"])] = (speedup, speedup / r["world_size"])
    return out


def efficiency_errors(section, rows) -> list[str]:
    """Rows of the numbers table whose speed-up or efficiency differs from ``expected_strong`` by over 0.5 %."""
    numbers = table(section, NUMBERS)
    col = {name: i for i, name in enumerate(numbers.header)}
    errors = []
    tokens = {"8k": 8192, "16k": 16384}
    for (layout, mask, length, world), (speedup, efficiency) in expected_strong(rows).items():
        match = [r for r in numbers.rows if r[col["layout"]] == layout and r[col["mask"]] == mask
                 and tokens[r[col["length"]]] == length and r[col["world size"]] == str(world)]
        assert len(match) == 1, (layout, mask, length, world)
        shown_speedup = float(text_of(match[0][col["speed-up"]]).split("×")[0])
        shown_efficiency = float(match[0][col["efficiency"]])
        if not math.isclose(shown_speedup, speedup, rel_tol=5e-3) or \
                not math.isclose(shown_efficiency, efficiency, rel_tol=5e-3):
            errors.append(f"{layout} {mask} {length} W={world}: {shown_speedup}/{shown_efficiency} "
                          f"!= {speedup:.4g}/{efficiency:.4g}")
    return errors


@pytest.fixture(scope="module")
def cp_run(tmp_path_factory):
    rows = cp_rows("cp")
    sections, folder = build(tmp_path_factory.mktemp("cp"), rows)
    return rows, sections, folder


def test_section_present_with_cp_rows_and_absent_without(cp_run, tmp_path):
    _, sections, folder = cp_run
    assert "cp" in sections
    assert report.main([str(folder)]) == 0
    assert '<a id="cp"></a>' in (folder / "report.md").read_text()
    assert '<section id="cp">' in (folder / "report.html").read_text()
    without, _ = build(tmp_path, fixture_rows("plain", cp=False, masks=("full",), modes=("fwd",)), "plain")
    assert "cp" not in without


def test_section_present_when_no_cp_row_is_ok(tmp_path):
    rows = [r for r in cp_rows("cp") if r["layout"] == "single" or r["status"] != "ok"]
    sections, _ = build(tmp_path, rows)
    section = sections["cp"]
    assert not [b for b in section.blocks if isinstance(b, Plot)]  # nothing measured: no figure
    matrix = table(section, "capability")
    assert {text_of(r[0]) for r in matrix.rows} == {"usp(ulysses=2)", "ring_allgather"}


def test_strong_scaling_matches_an_independent_computation(cp_run):
    rows, sections, _ = cp_run
    assert not efficiency_errors(sections["cp"], rows)
    names = {b.name for b in sections["cp"].blocks if isinstance(b, Plot)}
    assert {"cp-strong-0", "cp-weak-0", "cp-imbalance-0", "cp-bytes"} <= names


def test_negative_control_an_efficiency_left_undivided_is_caught(cp_run, tmp_path, monkeypatch):
    """A broken report (efficiency = speed-up, the world size forgotten) must fail the check above."""
    rows, _, _ = cp_run
    real = cp_section.cp_frame

    def broken(ctx):
        frame = real(ctx)
        frame["efficiency_calc"] = frame["speedup_calc"]
        return frame

    monkeypatch.setattr(cp_section, "cp_frame", broken)
    sections, _ = build(tmp_path, rows)
    errors = efficiency_errors(sections["cp"], rows)
    assert errors and all("W=" in e for e in errors)


def test_a_recorded_efficiency_computed_wrong_is_flagged(tmp_path):
    rows = cp_rows("cp", wrong_efficiency=True)
    sections, _ = build(tmp_path, rows)
    section = sections["cp"]
    assert not efficiency_errors(section, rows)  # the report shows the recomputed figures
    warnings = [b.text for b in section.blocks if isinstance(b, Text) and b.text.startswith("Warning")]
    ok_cp = sum(r["layout"] != "single" and r["status"] == "ok" for r in rows)
    assert len(warnings) == 1 and f"{ok_cp} row(s)" in warnings[0]
    numbers = table(section, NUMBERS)
    assert sum(r[-1] == "recorded differs" for r in numbers.rows) == ok_cp


def test_correct_recordings_raise_no_warning_and_nothing_impossible(cp_run):
    _, sections, _ = cp_run
    texts = " ".join(b.text for b in sections["cp"].blocks if isinstance(b, Text))
    assert "Warning" not in texts and "IMPOSSIBLE" not in texts
    assert not any(r[-1] for r in table(sections["cp"], NUMBERS).rows)


def test_impossible_speedup_is_flagged_visibly(tmp_path):
    sections, _ = build(tmp_path, cp_rows("cp", impossible=True))
    section = sections["cp"]
    texts = [b.text for b in section.blocks if isinstance(b, Text) and b.text.startswith("IMPOSSIBLE")]
    assert len(texts) == 1 and "usp(ulysses=2) full fwd_bwd 16k on 2" in texts[0]
    flagged = [c for r in table(section, NUMBERS).rows for c in r
               if isinstance(c, Cell) and "IMPOSSIBLE" in c.text]
    assert len(flagged) == 1 and flagged[0].status == "wrong" and flagged[0].text.startswith("3×")


def test_weak_scaling_holds_tokens_per_device_and_normalises_by_work(cp_run):
    rows, sections, _ = cp_run
    weak = table(sections["cp"], "Weak scaling")
    col = {name: i for i, name in enumerate(weak.header)}
    single = {r["seq_kv"]: r for r in rows if r["layout"] == "single" and r["mask"] == "full"}
    checked = 0
    for r in rows:
        if r["layout"] == "single" or r["status"] != "ok" or r["mask"] != "full":
            continue
        match = [w for w in weak.rows if w[col["layout"]] == r["layout"] and w[col["world size"]] ==
                 str(r["world_size"]) and w[col["length"]] == f"{r['seq_kv'] // 1024}k"]
        ref = single.get(r["seq_kv"] // r["world_size"])
        if ref is None:  # 8k on 4 ranks: no one-device row at 2k, so no weak-scaling point
            assert not match
            continue
        ratio = ref["ms_median"] / r["ms_median"]
        efficiency = r["flops"] / ref["flops"] * ref["ms_median"] / (r["world_size"] * r["ms_median"])
        assert len(match) == 1
        assert math.isclose(float(match[0][col["time ratio"]]), ratio, rel_tol=5e-3)
        assert math.isclose(float(match[0][col["weak efficiency"]]), efficiency, rel_tol=5e-3)
        # full attention: the plain time ratio is far below 1 although the layout is near ideal
        assert float(match[0][col["time ratio"]]) < 0.8 < float(match[0][col["weak efficiency"]])
        checked += 1
    assert checked == 3 * 3 == len(weak.rows)  # per layout: 8k on 2, 16k on 2 and on 4


def test_capability_matrix_by_layout_and_mask_with_reasons(cp_run):
    _, sections, _ = cp_run
    matrix = table(sections["cp"], "capability")
    assert matrix.header == ["layout", "causal", "document(n=4)", "full"]
    cells = {text_of(r[0]): r[1:] for r in matrix.rows}
    document = cells["usp(ulysses=2)"][1]
    assert document.status == "unsupported" and "per-document balancing" in document.title
    assert cells["ring(balance=zigzag)"][1].text == "not run"
    causal = cells["ring_allgather"][0]
    assert causal.status == "timeout" and "rank 3 hung" in causal.title and "ok 1" in causal.text
    reasons = table(sections["cp"], "Reasons for every CP status")
    assert {text_of(r[1]) for r in reasons.rows} == {"timeout", "unsupported"}


def test_rank_times_parse_and_reject_junk():
    assert cp_section.rank_times("1.5;2;2.5") == [1.5, 2.0, 2.5]
    assert cp_section.rank_times(None) is None and cp_section.rank_times("") is None
    assert cp_section.rank_times("1;x") is None and cp_section.rank_times(float("nan")) is None
