"""GPU tests of the measuring stage: CUDA-event timer, CUDA-graph timing, peak memory, telemetry, calibration,
and the gate at 4K and 64K (a kernel wrong by 1 % is wrong at both). Run on the lent H200 (pytest -m gpu)."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from attnbench.execute.runner import run_sweep
from attnbench.measure import timing as timers

from conftest import BASE, FAULTY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TIMING = {"budget_ms": 50, "warmup_ms": 5, "min_reps": 5, "max_reps": 50, "flush_l2": True, "cuda_graph": False,
          "telemetry": True, "energy_window_ms": 100}


def _sleep_kernel(cycles: int):
    return lambda: torch.cuda._sleep(cycles)


def test_cuda_event_timer_measures_a_kernel_of_known_length():
    device = torch.device("cuda:0")
    one = timers.time_callable(_sleep_kernel(2_000_000), device, TIMING, allow_graph=False)
    two = timers.time_callable(_sleep_kernel(4_000_000), device, TIMING, allow_graph=False)
    assert one.timer == "cuda_events" and one.reps >= 5
    # twice the spin, twice the time (within 10 %): the timer measures the kernel, not the launch
    assert 1.8 < two.ms_median / one.ms_median < 2.2, (one, two)
    assert one.ms_p20 <= one.ms_median <= one.ms_p80


def test_cuda_graph_timer_agrees_with_events_on_a_long_kernel():
    device = torch.device("cuda:0")
    events = timers.time_callable(_sleep_kernel(4_000_000), device, TIMING, allow_graph=False)
    graph = timers.time_callable(_sleep_kernel(4_000_000), device, {**TIMING, "cuda_graph": True}, allow_graph=True)
    assert graph.timer == "cuda_graph"
    assert abs(graph.ms_median / events.ms_median - 1.0) < 0.1, (events, graph)


def _cfg(tmp_path, **changes):
    cfg = copy.deepcopy(BASE)
    cfg.update(results_dir=str(tmp_path), run_id="gpu", device="cuda:0", dtype="bfloat16", heads_q=16, head_dim=128,
               timing=dict(TIMING), calibrate=True)
    cfg.update(changes)
    return cfg


def _frame(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "rows.parquet")


def test_peak_memory_telemetry_and_calibration_on_a_real_case(tmp_path):
    frame = _frame(run_sweep(_cfg(tmp_path, methods=["sdpa_cudnn"], masks=["full"], seq_lens=[8192],
                                  modes=["fwd", "fwd_bwd"]), "gpu test", show_progress=False))
    assert set(frame.status) == {"ok"}, frame[["mode", "status", "reason"]]
    by_mode = frame.set_index("mode")
    qkv_mb = 3 * 16 * 8192 * 128 * 2 / 2**20
    # fwd: the inputs plus at least the output; fwd_bwd: inputs, dout, output and three gradients at least
    assert by_mode.loc["fwd", "peak_mem_mb"] >= qkv_mb + qkv_mb / 3
    assert by_mode.loc["fwd_bwd", "peak_mem_mb"] >= 2 * qkv_mb + qkv_mb / 3
    assert by_mode.loc["fwd_bwd", "mem_above_inputs_mb"] > by_mode.loc["fwd", "mem_above_inputs_mb"]
    # telemetry reads the GPU the case ran on: a plausible clock and power under load
    assert (frame.sm_clock_mhz > 500).all() and (frame.power_w > 100).all(), frame[["sm_clock_mhz", "power_w"]]
    assert frame.gpu_uuid.notna().all()
    assert (frame.tflops > 100).all() and frame["flags"].isna().all(), frame[["tflops", "flags"]]


@pytest.mark.parametrize("seq", [4096, 65536])
def test_a_kernel_wrong_by_one_percent_is_wrong_at_4k_and_64k(tmp_path, seq):
    cfg = _cfg(tmp_path, plugins=[FAULTY], methods=["t_perturbed", "sdpa_cudnn"], masks=["causal"],
               seq_lens=[seq], heads_q=4, modes=["fwd"])
    frame = _frame(run_sweep(cfg, "gpu test", show_progress=False)).set_index("method")
    assert frame.loc["t_perturbed", "status"] == "wrong", frame.loc["t_perturbed", "reason"]
    assert frame.loc["sdpa_cudnn", "status"] == "ok"
    assert frame.loc["sdpa_cudnn", "rel_err"] < frame.loc["sdpa_cudnn", "err_tol"] < frame.loc["t_perturbed", "rel_err"]


def test_a_dense_bias_built_by_the_builder_counts_in_peak_memory(tmp_path):
    """sdpa_cudnn on a sliding window builds a [seq, seq] additive bf16 bias outside the timed call; it stays
    resident while the call runs, so peak_mem_mb must include it (it did not before resident_mb existed)."""
    seq = 16384
    frame = _frame(run_sweep(_cfg(tmp_path, methods=["sdpa_cudnn", "flex"], masks=["sliding_window(left=1024)"],
                                  seq_lens=[seq], modes=["fwd"]), "gpu test", show_progress=False)).set_index("method")
    assert set(frame.status) == {"ok"}, frame[["status", "reason"]]
    bias_mb = seq * seq * 2 / 2**20  # 512 MiB
    qkv_mb = 3 * 16 * seq * 128 * 2 / 2**20
    cudnn = frame.loc["sdpa_cudnn"]
    assert cudnn["resident_mb"] >= bias_mb, cudnn["resident_mb"]
    assert cudnn["peak_mem_mb"] >= bias_mb + qkv_mb, cudnn["peak_mem_mb"]
    # flex keeps only a BlockMask (tiny beside the bias)
    assert frame.loc["flex", "resident_mb"] < bias_mb / 8, frame.loc["flex", "resident_mb"]
