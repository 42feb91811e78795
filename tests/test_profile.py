"""timing.profile_calls: the timed call under torch.profiler, summed per kernel into the row (profile_top, ...)."""
from __future__ import annotations

import pytest

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute.case import CaseRunner
from attnbench.measure.profile import short_name, summarize

TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 2, "flush_l2": False}


def test_summarize_ranks_kernels_per_call_with_shares():
    events = [("void flash_fwd_kernel<Flash_fwd_params, 128>(Params)", 300.0), ("elementwise_kernel<4>(x)", 50.0),
              ("void flash_fwd_kernel<Flash_fwd_params, 128>(Params)", 300.0), ("elementwise_kernel<4>(x)", 50.0)]
    cols = summarize(events, calls=2)
    assert cols["profile_top"] == "flash_fwd_kernel=300us (86%);elementwise_kernel=50us (14%)"
    assert cols["profile_kernels"] == 2 and cols["profile_launches"] == 2.0
    assert cols["profile_kernel_ms"] == pytest.approx(0.35)  # (300 + 50) µs a call
    assert short_name("void a::b<c<d>, 1>(int, float)") == "a::b"
    with pytest.raises(ValueError):
        summarize(events, calls=0)
    assert summarize([], calls=1)["profile_kernel_ms"] is None and summarize([], calls=1)["profile_top"] is None


def test_profile_calls_fill_the_row_on_the_cpu_and_stay_out_of_the_timing():
    """A chunked linear method on the CPU: its operators are listed (matmuls among them); without the option the
    columns stay empty (negative control: the profiler runs only when asked)."""
    spec = masks.make_mask("causal")
    case = Case(method="linear_attn", mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=64,
                seq_kv=64, head_dim=8, dtype="float32", mode="fwd", seed=0)
    row = CaseRunner("cpu", {"timing": {**TIMING, "profile_calls": 2}}).run(case)
    assert row["status"] == "ok", row["reason"]
    assert row["profile_kernels"] >= 2 and row["profile_launches"] >= row["profile_kernels"]
    names = [part.split("=")[0] for part in row["profile_top"].split(";")]
    assert any("matmul" in n or "bmm" in n or "einsum" in n for n in names), names
    plain = CaseRunner("cpu", {"timing": TIMING}).run(case)
    assert plain["status"] == "ok" and plain.get("profile_top") is None
