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
    "err_tol": ("Float64", "tolerance of the gate: 2 x same-dtype reference error + floor"),
    "sm_clock_mhz": ("Float64", "median SM clock while timing, MHz"),
    "power_w": ("Float64", "mean board power while timing, W"),
    "temp_c": ("Float64", "GPU temperature after timing, C"),
    "energy_mj": ("Float64", "energy per call, mJ"),
    "flags": ("string", "sanity flags, ';'-separated (e.g. tflops_above_peak)"),
    "device": ("string", "device name"),
    "wall_s": ("Float64", "wall time the case took in the worker, s"),
    "started_at": ("string", "UTC time the case started"),
    # context-parallel cases (layout != single); empty for single-device rows
    "cp_balance": ("string", "CP load balancing: contiguous, zigzag (head-tail) or per_document"),
    "cp_kernel": ("string", "CP inner kernel per (query shard, KV chunk): math, flash, cudnn, efficient, flex; "
                            "the method itself for ulysses; 'torch METHOD' for torch_cp"),
    "ms_rank_max": ("Float64", "slowest rank's median time per call, ms (CP)"),
    "ms_rank_mean": ("Float64", "mean over ranks of each rank's median time per call, ms (CP)"),
    "imbalance": ("Float64", "ms_rank_max / ms_rank_mean (1 = balanced; CP)"),
    "rank_ms": ("string", "each rank's median time per call, ms, ';'-separated in rank order (CP)"),
    "comm_bytes": ("Float64", "bytes one rank sends per timed call as its algorithm prescribes, max over "
                              "ranks (p2p payloads; all-to-all to other ranks; (n-1) x shard for all-gather and "
                              "reduce-scatter) (CP)"),
    "comm_gbps": ("Float64", "comm_bytes / ms_median, GB/s per rank (CP)"),
    "single_ms": ("Float64", "ms_median of the same case on one device in this run, when measured (CP)"),
    "speedup": ("Float64", "single_ms / ms_median (CP; flagged when above world_size)"),
    "efficiency": ("Float64", "speedup / world_size (CP)"),
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
