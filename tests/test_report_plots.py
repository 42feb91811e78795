"""The style module's axis logic and the grouping of rows into figures."""
import pytest
from runfixtures import make_row, write_run

from attnbench.record.rundir import load_run
from attnbench.report import plots
from attnbench.report.context import prepare_rows
from attnbench.report.formatting import fmt
from attnbench.report.tables import length_table


@pytest.mark.parametrize("low, high, base, subs, most, expected", [
    (1024, 16384, 2, (1.0,), 7, [1024, 2048, 4096, 8192, 16384]),
    (256, 131072, 2, (1.0,), 7, [512, 2048, 8192, 32768, 131072]),  # every 2nd, counted from the top
    (10, 300, 10, (1.0, 2.0, 5.0), 8, [10, 20, 50, 100, 200]),
    (0.005, 200, 10, (1.0, 2.0, 5.0), 8, [0.01, 0.1, 1, 10, 100]),  # too many 1-2-5 ticks: decades
    (1.1, 1.9, 10, (1.0, 2.0, 5.0), 8, [1.3, 1.4, 1.7]),  # no round value inside: three spread ticks
])
def test_log_ticks_stay_inside_the_range_and_few(low, high, base, subs, most, expected):
    ticks = plots.log_ticks(low, high, base, subs, most)
    assert ticks == pytest.approx(expected)
    assert all(low <= t <= high for t in ticks) and len(ticks) <= most


def test_token_labels():
    assert [plots.tokens(v) for v in (512, 1024, 65536, 1 << 20, 3 << 20, 1536)] == \
        ["512", "1k", "64k", "1M", "3M", "1536"]


def test_palette_is_stable_and_distinct():
    labels = [f"m{i}" for i in range(30)]
    palette = plots.Palette(reversed(labels))
    styles = [palette[label] for label in labels]
    assert len(set(styles)) == 30
    assert plots.Palette(labels)["m3"] == palette["m3"]


def test_two_query_lengths_per_key_length_split_the_figure_rows(tmp_path):
    rows = [make_row("r", "sdpa", "causal", "fwd", 4096), make_row("r", "sdpa", "causal", "fwd", 8192)]
    short_q = make_row("r", "sdpa", "causal", "fwd", 4096, seq_q=512, case_id="q512")
    folder = write_run(tmp_path, "r", [*rows, short_q])
    prepared = prepare_rows([load_run(folder)])
    # the self-attention curve stays one row; the fixed query length gets its own
    assert sorted(set(prepared["shape"])) == ["b1 · h16/16 · d128 · bf16 · seq_q 512",
                                              "b1 · h16/16 · d128 · bf16 · seq_q = seq_kv"]
    assert (prepared["shape"] == "b1 · h16/16 · d128 · bf16 · seq_q = seq_kv").sum() == 2
    assert set(prepared["figure"]) == {"causal · causal_self · fwd"}


def shapes_of(tmp_path, rows):
    prepared = prepare_rows([load_run(write_run(tmp_path, "r", rows))])
    return prepared.groupby("shape")["seq_kv"].apply(sorted).to_dict()


def test_a_constant_token_sweep_is_one_curve_per_method(tmp_path):
    rows = [make_row("r", "sdpa", "causal", "fwd", length, batch=16384 // length) for length in (1024, 4096, 16384)]
    assert shapes_of(tmp_path, rows) == {"h16/16 · d128 · bf16 · b×seq_q = 16,384": [1024, 4096, 16384]}


def test_a_batch_that_varies_otherwise_is_named_and_shown_per_length(tmp_path):
    rows = [make_row("r", "sdpa", "causal", "fwd", length, batch=batch) for length, batch in ((1024, 8), (4096, 1))]
    assert shapes_of(tmp_path, rows) == {"h16/16 · d128 · bf16 · batch varies with length": [1024, 4096]}
    prepared = prepare_rows([load_run(tmp_path / "r")])
    header, _ = length_table(prepared, "ms_median", fmt)
    assert header == ["method", "1k (b8)", "4k (b1)"]


def test_two_batches_at_one_length_make_two_curves(tmp_path):
    rows = [make_row("r", "sdpa", "causal", "fwd", length, batch=batch, case_id=f"{length}-{batch}")
            for length in (1024, 4096) for batch in (1, 8)]
    assert shapes_of(tmp_path, rows) == {"b1 · h16/16 · d128 · bf16": [1024, 4096],
                                         "b8 · h16/16 · d128 · bf16": [1024, 4096]}
