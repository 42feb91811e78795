"""Measurement pieces: timer statistics, the reference, SDPA on GQA/cross, flex compiled, flash-attn adapter."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from attnbench import masks
from attnbench.execute.case import CaseRunner, rel_error
from attnbench.config.plan import Case
from attnbench.measure.timing import summarize, time_callable
from attnbench.methods.exact.reference import reference_attention

TIMING = {"budget_ms": 2, "warmup_ms": 0, "min_reps": 3, "max_reps": 5, "flush_l2": True, "cuda_graph": False}


def test_summary_statistics():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0], "perf_counter")
    assert (t.ms_median, t.ms_min, t.reps) == (3.0, 1.0, 5)
    assert t.ms_p20 == pytest.approx(1.8) and t.ms_p80 == pytest.approx(4.2)


def test_cpu_timer_respects_rep_bounds():
    calls = []
    result = time_callable(lambda: calls.append(1), "cpu", {**TIMING, "budget_ms": 1000, "max_reps": 7})
    assert result.reps == 7 and result.timer == "perf_counter" and len(calls) >= 8


class _FakeClock:
    """CUDA events and synchronize on a CPU machine: a call advances a fake clock by its length in ms."""

    def __init__(self):
        self.now = 0.0

    def event(self, enable_timing=True):
        clock = self

        class Event:
            def record(self):
                self.t = clock.now

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return other.t - self.t

        return Event()


@pytest.mark.parametrize("call_ms,primed,calls,long_ms", [
    (100.0, False, 2 + 1, 1000.0), (100.0, True, 1 + 1, 1000.0),
    (12000.0, True, 1, 1000.0),  # a primed long call: its first timed call is the repetition
    (12000.0, True, 1 + 1, 0.0),  # long_call_ms 0 (off): a warm-up call apart, as before (negative control)
    (12000.0, False, 1 + 1 + 1, 1000.0),  # not primed: untimed, warm-up, repetition (the rule needs a primed call)
    (10.0, True, 5 + 3, 1000.0), (10.0, False, 1 + 5 + 3, 1000.0)])
def test_cuda_warmup_repeats_only_what_the_budget_asks(monkeypatch, call_ms, primed, calls, long_ms):
    """Warm-up calls within warmup_ms (50), at least one timed; a call longer than the budget is not repeated,
    and a primed call (the case runner's memory phase ran it) gets no extra untimed call; a primed call of at
    least long_call_ms is timed once and that is the first repetition (flagged). Negative control: the old rule
    (at least two timed warm-up calls after an untimed one) makes a 12 s call cost 3 calls before its timed
    repetition (84 s a case at 1M with the case runner's other calls)."""
    from attnbench.measure import timing as timing_module

    clock = _FakeClock()
    monkeypatch.setattr(torch.cuda, "Event", clock.event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(timing_module, "CpuProbe", lambda cpu_rule=False: None)
    monkeypatch.setattr(timing_module, "_flagged", lambda result, probe: result)
    made = []

    def fn():
        made.append(1)
        clock.now += call_ms

    settings = {"budget_ms": 30, "warmup_ms": 50, "min_reps": 1, "max_reps": 3, "flush_l2": False,
                "long_call_ms": long_ms}
    result = timing_module.time_cuda(fn, torch.device("cpu"), settings, primed=primed)
    assert len(made) == calls and result.ms_median == call_ms
    assert ("first_call_as_sample" in result.flags) == (primed and 0 < long_ms <= call_ms)
    assert result.reps == 1 if call_ms > 30 else result.reps == 3


def test_a_long_call_with_repetitions_left_keeps_its_first_sample(monkeypatch):
    """A 2 s primed call with min_reps 3: the first timed call and two more (three samples, three calls)."""
    from attnbench.measure import timing as timing_module

    clock = _FakeClock()
    monkeypatch.setattr(torch.cuda, "Event", clock.event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(timing_module, "CpuProbe", lambda cpu_rule=False: None)
    monkeypatch.setattr(timing_module, "_flagged", lambda result, probe: result)
    times = iter([2000.0, 2100.0, 1900.0, 5000.0])

    def fn():
        clock.now += next(times)

    settings = {"budget_ms": 30, "warmup_ms": 50, "min_reps": 3, "max_reps": 3, "flush_l2": False}
    result = timing_module.time_cuda(fn, torch.device("cpu"), settings, primed=True)
    assert sorted(result.samples) == [1900.0, 2000.0, 2100.0] and result.ms_median == 2000.0


@pytest.mark.parametrize("heads_kv, seq_q, seq_kv", [(4, 24, 24), (2, 24, 24), (1, 8, 40)])
def test_reference_matches_sdpa_math_with_gqa_cross_and_grads(heads_kv, seq_q, seq_kv):
    torch.manual_seed(0)
    q = torch.randn(2, 4, seq_q, 16, dtype=torch.float64)
    k = torch.randn(2, heads_kv, seq_kv, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, heads_kv, seq_kv, 16, dtype=torch.float64, requires_grad=True)
    q.requires_grad_(True)
    dout = torch.randn(2, 4, seq_q, 16, dtype=torch.float64)
    bound = masks.make_mask("causal").bind(seq_q, seq_kv)
    out, (dq, dk, dv) = reference_attention(q, k, v, bound, compute_dtype=torch.float64, dout=dout, chunk_bytes=4096)
    visible = bound.dense()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=heads_kv != 4)
    want.backward(dout)
    assert rel_error(out, want) < 1e-12
    for got, exp in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert rel_error(got, exp) < 1e-12


def _case(method, mode="fwd", mask="causal", **kw):
    spec = masks.make_mask(mask)
    base = dict(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=1, seq_q=64,
                seq_kv=64, head_dim=16, dtype="float32", mode=mode)
    base.update(kw)
    return Case(**base)


def _runner():
    return CaseRunner("cpu", {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32})


def test_exact_methods_pass_the_gate_in_every_mode():
    runner = _runner()
    for method in ("reference", "eager", "sdpa_math", "sdpa_flash"):
        for mode in ("fwd", "bwd", "fwd_bwd"):
            row = runner.run(_case(method, mode))
            assert row["status"] == "ok", (method, mode, row["reason"])
            assert row["rel_err"] < row["err_tol"] < 1e-3


@pytest.mark.slow  # an inductor compile on the CPU
def test_flex_compiled_runs_on_cpu_and_declines_backward():
    runner = _runner()
    row = runner.run(_case("flex", "fwd", mask="causal", seq_q=128, seq_kv=128))
    assert row["status"] == "ok", row["reason"]
    assert row["compile_s"] > row["ms_median"] / 1e3  # compile time is recorded apart from the kernel time
    row = runner.run(_case("flex", "fwd_bwd"))
    assert row["status"] == "unsupported" and "backward on CPU" in row["reason"]


def test_flash_attn_adapter_with_a_stub_module(monkeypatch):
    """The flash-attn method's layout and varlen plumbing, against a stub with flash-attn's signatures."""
    from attnbench import methods

    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
        assert q.shape[1] == 64 and q.shape[2] == 2  # [B, S, H, D]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2)

    stub = types.SimpleNamespace(flash_attn_func=flash_attn_func)
    monkeypatch.setitem(sys.modules, "flash_attn", stub)
    spec = methods.METHODS["flash_attn"]
    cpu_caps = spec.caps.__class__(**{**spec.caps.__dict__, "devices": ("cpu",), "dtypes": ("float32",),
                                      "requires": ()})
    monkeypatch.setattr(spec, "caps", cpu_caps)
    row = _runner().run(_case("flash_attn"))
    assert row["status"] == "ok", row["reason"]


def _peak_flags(row) -> list[str]:
    """The row's peak flags (a busy test machine may add cpu_interference(...), which is not judged here)."""
    return [f for f in (row["flags"] or "").split(";") if "above_peak" in f]


def test_rows_above_the_device_peak_are_flagged():
    runner = _runner()
    runner.peak_tflops = 1e-9  # any measured rate is above this "peak"
    row = runner.run(_case("sdpa_math"))
    assert row["status"] == "ok" and _peak_flags(row)[0].startswith("tflops_above_peak")
    runner.peak_tflops = 1e9
    assert _peak_flags(runner.run(_case("sdpa_math"))) == []
    runner.peak_gbps = 1e-9
    assert _peak_flags(runner.run(_case("sdpa_math")))[0].startswith("gbps_above_peak")
    runner.peak_gbps = 1e9
    assert _peak_flags(runner.run(_case("sdpa_math"))) == []


def test_compiler_settings_a_builder_changes_do_not_reach_the_next_case():
    import torch._functorch.config as functorch_config

    from attnbench import methods

    before = functorch_config.donated_buffer

    @methods.register_method("t_flips_config", methods.Capabilities(backward=False, masks={"any"}))
    def build(ctx):
        """Changes a global compiler setting, as the flex builder does for bwd timing."""
        functorch_config.donated_buffer = not before
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)

    try:
        row = _runner().run(_case("t_flips_config", mask="full"))
        assert row["status"] == "ok", row["reason"]
        assert functorch_config.donated_buffer == before
    finally:
        methods.METHODS.pop("t_flips_config")
        functorch_config.donated_buffer = before


FIRST_IMPORT = """
import json
import sys
import torch.nn.functional as F
from attnbench import masks, methods
from attnbench.config.plan import Case
from attnbench.execute.case import CaseRunner

@methods.register_method("t_imports_the_compiler", methods.Capabilities(backward=False, masks={"any"}))
def build(ctx):
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    dynamo_config.recompile_limit += 5
    functorch_config.donated_buffer = not functorch_config.donated_buffer
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)

spec = masks.make_mask("full")
runner = CaseRunner("cpu", {"timing": %r, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32})
for method in ("sdpa_math", "t_imports_the_compiler"):
    row = runner.run(Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=1,
                          seq_q=32, seq_kv=32, head_dim=16, dtype="float32", mode="fwd"))
    assert row["status"] == "ok", row["reason"]
    if method == "sdpa_math":  # a case that compiles nothing imports neither
        assert not {"torch._dynamo", "torch._functorch.config"} & set(sys.modules), method
import torch._dynamo.config as dynamo_config
import torch._functorch.config as functorch_config

print(json.dumps([dynamo_config.recompile_limit, functorch_config.donated_buffer]))
build(None)  # control: the same change outside a case stays
print(json.dumps([dynamo_config.recompile_limit, functorch_config.donated_buffer]))
"""


def test_a_case_that_first_imports_the_compiler_settings_gets_them_back_as_imported():
    """A worker whose cases compile nothing never imports torch._dynamo (~1.5 s of CPU a process); the case that
    imports the compiler first and changes its settings gets them put back to what the import left."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, "-c", FIRST_IMPORT % (TIMING,)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    after_case, after_control = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    import torch._dynamo.config as dynamo_config

    limit = dynamo_config._config["recompile_limit"].default
    assert after_case == [limit, True], after_case  # the import's settings (donated_buffer's default: True)
    assert after_control == [limit + 5, False], after_control
