"""scripts/linear_summary.py: slopes, efficiency length and fla ratios from synthetic rows of known shape."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from scriptload import load_script


def _module():
    return load_script("linear_summary")


def _row(method, n, ms, mode="fwd_bwd", status="ok", **kw):
    return {"case_id": f"{method}-{mode}-{n}", "method": method, "mode": mode, "seq_q": n, "seq_kv": n,
            "ms_median": ms, "status": status, "reason": None if status == "ok" else "why", "tflops": 1.0,
            "peak_mem_mb": 2048.0, "mask": "causal", **kw}


def _write_run(tmp_path, name, rows) -> str:
    run = tmp_path / name
    run.mkdir()
    (run / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(run)


def test_slope_efficiency_length_and_fla_ratio(tmp_path, capsys):
    lengths = [2048, 8192, 32768, 131072, 1 << 20]
    rows = []
    for n in lengths:
        rows.append(_row("linear_attn", n, 1e-3 * n))  # slope 1
        rows.append(_row("fla_linear_attn", n, 0.5e-3 * n))  # half the time: ratio 2.00x
        if n <= 131072:
            rows.append(_row("sdpa_cudnn", n, 1e-3 * n * n / 8192))  # slope 2, equal at 8K
    rows.append(_row("softmax_rnn", 2048, 1.0, status="oom"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert _module().main([str(run)]) == 0
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if l.startswith("| linear_attn | fwd_bwd"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2] == "1.00"  # slope
    assert cells[3] == "1.05e+03"  # 1M ms
    assert cells[6] == "~8.0K"  # efficiency length: crossing at 8K
    assert "1024K: 2.00x" in cells[7]
    assert "| softmax_rnn | fwd_bwd | 2048 | oom | why |" in text


def test_efficiency_length_bounds():
    eff = _module().efficiency_length
    assert eff({1: 1.0, 2: 1.0}, {1: 2.0, 2: 4.0}).startswith("<=")
    assert eff({1024: 9.0, 2048: 9.0}, {1024: 1.0, 2048: 2.0}) == "> 2K"


def test_runs_merge_latest_row_wins_impl_is_its_own_line_and_decode_run_is_found(tmp_path, capsys):
    def write(name, rows):
        return _write_run(tmp_path, name, rows)

    lengths = [32768, 131072, 1 << 20]
    old = write("old", [_row("linear_attn", n, 3e-3 * n, started_at="2026-12-01T10:00:00") for n in lengths]
                + [_row("sdpa_cudnn", n, 1e-3 * n * n / 8192, started_at="2026-12-01T10:00:00") for n in lengths[:2]])
    new = write("new", [_row("linear_attn", n, 1e-3 * n, started_at="2026-12-02T10:00:00") for n in lengths]
                + [_row("performer", n, 2e-3 * n, method_options='{"impl": "triton"}', started_at="2026-12-02T10:00:00")
                   for n in lengths])
    dec = write("dec", [_row("linear_attn", n, 0.1, mode="decode") for n in lengths])
    # the older run given last: started_at decides, not the order on the command line
    assert _module().main([new, dec, old]) == 0
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if l.startswith("| linear_attn | fwd_bwd"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[3] == "1.05e+03", line  # the newer run's 1M time (the older: 3.15e+03)
    assert cells[9] == "new", line
    assert any(l.startswith("| performer [impl=triton] | fwd_bwd") for l in text.splitlines())
    assert "## Decode: ms per step against context" in text
    assert _module().impl_label("performer", '{"impl": "chunked"}') == "performer"


def test_fill_run_adds_only_missing_lengths(tmp_path, capsys):
    """A --fill run's 256K row joins the line; its 32K row (the line has one) does not replace the measured one."""
    def write(name, rows):
        return _write_run(tmp_path, name, rows)

    main = write("main", [_row("linear_attn", n, 1e-3 * n, started_at="2026-12-01") for n in (32768, 131072)])
    fill = write("fill", [_row("linear_attn", 32768, 999.0, started_at="2026-12-02"),
                          _row("linear_attn", 262144, 1e-3 * 262144, started_at="2026-12-02")])
    assert _module().main([main, "--fill", fill]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| linear_attn | fwd_bwd"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2] == "1.00", line  # slope 1 over 32K-256K: the fill's 999 ms at 32K would bend it
    assert cells[8] == "32K, 128K, 256K" and cells[9] == "fill, main", line


def test_a_later_fill_replaces_a_failed_point_but_not_an_ok_one(tmp_path, capsys):
    """The 1M cell that was `oom` before a memory fix takes the later fill's row; an older fill's row does not."""
    main = _write_run(tmp_path, "main", [_row("abc", n, 1e-3 * n, started_at="2026-12-01") for n in (32768, 131072)]
                      + [_row("abc", 1 << 20, None, status="oom", started_at="2026-12-01")])
    later = _write_run(tmp_path, "later", [_row("abc", 1 << 20, 1e-3 * (1 << 20), started_at="2026-12-02"),
                                           _row("abc", 32768, 999.0, started_at="2026-12-02")])
    older = _write_run(tmp_path, "older", [_row("abc", 1 << 20, 5.0, started_at="2026-11-30")])

    def line(*args):
        assert _module().main([main, *args]) == 0
        text = capsys.readouterr().out
        return [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| abc | fwd_bwd")).split("|")[1:-1]]

    cells = line("--fill", later)
    assert cells[3] == "1.05e+03" and cells[2] == "1.00", cells  # the 1M row from the fill; 32K kept (ok)
    cells = line("--fill", older)  # negative control: measured before the oom row, it does not replace it
    assert cells[3].startswith("oom"), cells


def test_run_with_methods_supplies_only_those_lines(tmp_path, capsys):
    main = _write_run(tmp_path, "main", [_row(m, n, 1e-3 * n, started_at="2026-12-01")
                                         for m in ("abc", "lamamba") for n in (32768, 131072)])
    again = _write_run(tmp_path, "again", [_row(m, 32768, 7.0, started_at="2026-12-02") for m in ("abc", "lamamba")])
    assert _module().main([main, again + "=lamamba"]) == 0
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[1:-1]]
            for l in capsys.readouterr().out.splitlines() if "| fwd_bwd |" in l}
    assert rows["lamamba"][9] == "again" and rows["lamamba"][8] == "32K"
    assert rows["abc"][9] == "main" and rows["abc"][8] == "32K, 128K"  # not taken from `again`
    import pytest
    with pytest.raises(SystemExit, match="no rows of nope"):
        _module().main([main, again + "=nope"])


def test_work_table_rates_against_the_runs_calibration_and_names_the_bound(tmp_path, capsys):
    """linear_attn_triton at 1M, d 128, 16 heads: 4·d² + 2·64·d FLOPs per token-head; a time that makes it
    60 % of the run's matmul ceiling reads `compute` (a copy ceiling of 40 TB/s keeps the bytes under it), a
    slow one `neither`; a run without calibration says so."""
    module = _module()
    flops, tensors = module.model_work("linear_attn_triton", "fwd", 128)
    assert flops == 4 * 128 * 128 + 2 * 64 * 128 and tensors == 4
    assert module.model_work("delta_rule [impl=triton]", "fwd_bwd", 128)[0] == 3 * (6 * 128 ** 2 + 7 * 64 * 128 + 64 ** 2 / 3)
    assert module.model_work("aaren", "fwd", 128) is None  # no standard count: no line
    token_heads = 16 << 20
    fast_ms = flops * token_heads / (0.6 * 700e12) * 1e3  # 60 % of a 700 TFLOP/s ceiling

    def run(name, ms, calibrated=True):
        path = _write_run(tmp_path, name, [_row("linear_attn_triton", 1 << 20, ms, mode="fwd", head_dim=128,
                                                heads_q=16, batch=1, dtype="bfloat16")])
        if calibrated:
            (Path(path) / "env.json").write_text(json.dumps([{"calibration": {"matmul_bf16_tflops": 700.0,
                                                                               "copy_tbps": 40.0}}]))
        assert module.main([path]) == 0
        text = capsys.readouterr().out
        return [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| linear_attn_triton | fwd | 1024K")).split("|")[1:-1]]

    cells = run("fast", fast_ms)
    assert cells[5] == "60.0 %" and cells[8] == "compute", cells
    assert run("slow", 100 * fast_ms)[8].startswith("neither"), "a 0.6 % rate is not compute-bound"
    assert run("bare", fast_ms, calibrated=False)[8] == "no calibration"


def test_label_names_each_code_path_option_and_lengths_below_1k_keep_their_number():
    """delta_rule measured with solve=triton is its own line, not folded into the impl=triton line (whose fla
    ratio would then mix two solves); lengths 128 / 512 print as numbers, not as 0K."""
    module = _module()
    assert module.impl_label("delta_rule", '{"chunk": 64, "impl": "triton"}') == "delta_rule [impl=triton]"
    assert (module.impl_label("delta_rule", '{"chunk": 64, "impl": "triton", "solve": "triton"}')
            == "delta_rule [impl=triton, solve=triton]")
    assert module.impl_label("delta_rule", '{"impl": "triton", "solve": "torch"}') == "delta_rule [impl=triton]"
    assert module.impl_label("delta_rule", "not json") == "delta_rule"
    assert (module.impl_label("delta_rule", '{"impl": "triton", "solve": "fused", "wy_backward": "triton"}')
            == "delta_rule [impl=triton, solve=fused, wy_backward=triton]")
    assert (module.impl_label("delta_rule", '{"impl": "triton", "dot_precision": "bf16", "solve": "triton"}')
            == "delta_rule [impl=triton, solve=triton, dot_precision=bf16]")
    assert module.impl_label("nats_l", '{"softmax": "flex"}') == "nats_l [softmax=flex]"
    # the fourteenth session's options: the in-loop outputs and the fused kernel's precision are lines of their own
    assert (module.impl_label("delta_rule", '{"impl": "triton", "solve": "fused", "outputs": "triton"}')
            == "delta_rule [impl=triton, solve=fused, outputs=triton]")
    assert (module.impl_label("delta_rule", '{"solve": "fused", "wy_precision": "tf32", "outputs": "torch"}')
            == "delta_rule [solve=fused, wy_precision=tf32]")
    assert module.impl_label("lamamba", '{"stream": 0}') == "lamamba [stream=0]"
    assert module.impl_label("lamamba", '{"stream": "auto"}') == "lamamba"
    assert module.impl_label("nats_l", '{"softmax": "auto", "dot_precision": "tf32"}') == "nats_l"
    assert [module.klen(n) for n in (128, 512, 2048, 1 << 20, 1536)] == ["128", "512", "2K", "1024K", "1536"]


def test_a_row_is_labelled_by_the_code_path_its_auto_defaults_resolved_to():
    """Rows made since resolved_options: an `auto` default (nothing in method_options) that ran the fused kernel is
    the same line as the rows that asked for it explicitly; an older row without the column keeps the historical
    default's line; resolved wins over an explicit `auto`."""
    module = _module()
    frame = pd.DataFrame({
        "method": ["delta_rule"] * 4,
        "method_options": [None, '{"impl": "triton", "solve": "fused", "wy_precision": "tf32"}', None,
                           '{"impl": "auto"}'],
        "resolved_options": ['{"impl": "triton", "solve": "fused", "wy_precision": "tf32"}', None, None,
                             '{"impl": "torch", "solve": "torch"}']})
    labels = list(module.labelled(frame.copy())["method"])
    assert labels[0] == labels[1] == "delta_rule [impl=triton, solve=fused, wy_precision=tf32]"
    assert labels[2] == labels[3] == "delta_rule"


def test_lines_measured_only_below_min_fit_get_their_own_table(tmp_path, capsys):
    """tensor_attn (128 / 512 only) lists its times; linear_attn (to 128K) does not; with no short line the
    table is absent (negative control)."""
    rows = [_row("tensor_attn", 128, 5.6), _row("tensor_attn", 512, 28.0),
            _row("tensor_attn", 2048, None, status="unsupported"),
            *[_row("linear_attn", n, 1e-3 * n) for n in (8192, 32768, 131072)]]
    assert _module().main([_write_run(tmp_path, "short", rows)]) == 0
    text = capsys.readouterr().out
    assert "## Lines measured only below 32K" in text
    assert "| tensor_attn | fwd_bwd | 128: 5.6 ms, 512: 28 ms |" in text
    assert not any(l.startswith("| linear_attn | fwd_bwd | 8K:") for l in text.splitlines())
    assert _module().main([_write_run(tmp_path, "long", rows[3:])]) == 0
    assert "measured only below" not in capsys.readouterr().out


def test_ungated_rows_of_a_line_that_failed_its_gate_leave_the_figures():
    """A line wrong at 8K whose 128K / 1M rows passed on the forward only (grads_not_gated): those rows become
    ``ungated`` and leave the curve; another line's flagged rows (no wrong row: negative control) stay ok."""
    import pandas as pd

    module = _module()
    flag = "grads_not_gated(seq_q*seq_kv>ref_full_pairs)"
    frame = pd.DataFrame([_row("broken", 8192, None, status="wrong"),
                          _row("broken", 131072, 10.0, flags=flag), _row("broken", 1 << 20, 80.0, flags=flag),
                          _row("broken", 131072, 3.0, mode="fwd"),
                          _row("fine", 8192, 1.0), _row("fine", 131072, 10.0, flags=flag)])
    out = module.distrust_ungated(frame)
    assert list(out.status) == ["wrong", "ungated", "ungated", "ok", "ok", "ok"]
    assert "failed (wrong) at 8K" in out.reason.iloc[1]
    assert module.curve(out, "broken", "fwd_bwd") == {}
    assert module.curve(out, "fine", "fwd_bwd") == {8192: 1.0, 131072: 10.0}
    assert module.curve(out, "broken", "fwd") == {131072: 3.0}  # another mode of the line: its own gate
