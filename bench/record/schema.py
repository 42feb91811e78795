"""The row: one per case, whatever happened (DESIGN.md §6).

Every column is listed here with its dtype and unit. A metric that was not measured is empty (None / NaN),
never a sentinel number. ``reason`` is non-empty for every status but ``ok``.
"""
from __future__ import annotations

STATUSES = ("ok", "unsupported", "wrong", "oom", "error", "crashed", "timeout")
MODES = ("fwd", "bwd", "fwd_bwd", "decode")
PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")

# name -> (pandas dtype, description with unit)
COLUMNS: dict[str, tuple[str, str]] = {
    "run_id": ("string", "run folder name"),
    "case_id": ("string", "stable hash of the case's key fields"),
    "method": ("string", "registered method name"),
    "family": ("string", "method family: exact, sparse, linear, ..."),
    "exact": ("boolean", "method computes exact attention (gated as wrong when off)"),
    "mask": ("string", "canonical mask label with parameters"),
    "mask_name": ("string", "registered mask name"),
    "pattern": ("string", "CAB pattern: (non)causal x self/cross"),
    "batch": ("Int64", "batch size"),
    "heads_q": ("Int64", "query heads"),
    "heads_kv": ("Int64", "key/value heads (GQA when < heads_q)"),
    "seq_q": ("Int64", "query length, tokens"),
    "seq_kv": ("Int64", "key/value length, tokens"),
    "head_dim": ("Int64", "head dimension"),
    "dtype": ("string", "working dtype"),
    "mode": ("string", "fwd, bwd, fwd_bwd or decode"),
    "layout": ("string", "single, or CP strategy"),
    "world_size": ("Int64", "GPUs in the layout"),
    "seed": ("Int64", "input seed"),
    "status": ("string", "ok, unsupported, wrong, oom, error, crashed, timeout"),
    "reason": ("string", "why, for every status but ok"),
    "ms_median": ("Float64", "median time per call, ms"),
    "ms_p20": ("Float64", "20th percentile, ms"),
    "ms_p80": ("Float64", "80th percentile, ms"),
    "ms_min": ("Float64", "fastest repetition, ms"),
    "reps": ("Int64", "timed repetitions"),
    "timer": ("string", "cuda_events, cuda_graph or perf_counter"),
    "compile_s": ("Float64", "build + compile + first call, s (never inside ms_*)"),
    "visible_pairs": ("Int64", "visible (q, kv) pairs per batch element and head"),
    "density": ("Float64", "visible_pairs / (seq_q * seq_kv)"),
    "flops": ("Float64", "FLOPs of one call from the exact visible pairs"),
    "tflops": ("Float64", "flops / ms_median, TFLOP/s (attention-equivalent for approximate methods)"),
    "bytes_moved": ("Float64", "minimum bytes read + written by one call (q, k, v, out, grads)"),
    "gbps": ("Float64", "bytes_moved / ms_median, GB/s"),
    "peak_mem_mb": ("Float64", "allocator peak during one call, MiB"),
    "mem_above_inputs_mb": ("Float64", "peak minus the inputs' bytes, MiB"),
    "rel_err": ("Float64", "||out - ref_fp32|| / ||ref_fp32|| (max over out and grads)"),
    "err_tol": ("Float64", "tolerance of the gate for the tensor that came closest to failing: a constant per dtype "
                           "(output and gradients apart; bench/measure/gate.py TOLERANCE), never widened with length"),
    "approx_err": ("Float64", "approximate methods: ||out - softmax_ref_fp32|| / ||softmax_ref_fp32|| over query rows "
                              "that see a key (distance from exact attention; recorded, never gated)"),
    "attended_pairs": ("Int64", "(query, key) pairs the method attended, summed over batch and query heads (methods "
                                "that report it: routed and sparse ones)"),
    "tflops_attended": ("Float64", "TFLOP/s on attended pairs: 4 * attended_pairs * head_dim * mode factor / time"),
    "phase_ms": ("string", "median ms of phases the method declares, timed alone ('routing=0.41;...')"),
    "routing_share": ("Float64", "routing phase median / whole call median (methods that declare a routing phase)"),
    "state_bytes": ("Int64", "recurrent decode: bytes of the state per sequence (batch element)"),
    "sm_clock_mhz": ("Float64", "median SM clock while timing, MHz"),
    "power_w": ("Float64", "mean board power while timing, W"),
    "temp_c": ("Float64", "GPU temperature after timing, C"),
    "energy_mj": ("Float64", "energy per call, mJ"),
    "flags": ("string", "sanity flags, ';'-separated (e.g. tflops_above_peak)"),
    "device": ("string", "device name"),
    "wall_s": ("Float64", "wall time the case took in the worker, s"),
    "started_at": ("string", "UTC time the case started"),
}

KEY_FIELDS = (
    "method", "mask", "batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim", "dtype", "mode",
    "layout", "world_size", "seed",
)


def empty_row() -> dict:
    return {name: None for name in COLUMNS}


def to_frame(rows):
    """Rows (dicts) as a DataFrame with every schema column, in schema order, typed."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    for name, (dtype, _) in COLUMNS.items():
        if name not in frame:
            frame[name] = None
        frame[name] = frame[name].astype(dtype)
    extra = [c for c in frame.columns if c not in COLUMNS]
    return frame[list(COLUMNS) + extra]
