"""The row: one per case, whatever happened (DESIGN.md §6).

Every column is listed here with its dtype and unit. A metric that was not measured is empty (None / NaN),
never a sentinel number. ``reason`` is non-empty for every status but ``ok``.
"""
from __future__ import annotations

STATUSES = ("ok", "unsupported", "wrong", "oom", "error", "crashed", "timeout")
MODES = ("fwd", "bwd", "fwd_bwd", "decode")
PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")

# name -> (pandas dtype, description: what is counted, and the unit). "MiB" = 2**20 bytes, "GB" = 1e9 bytes.
COLUMNS: dict[str, tuple[str, str]] = {
    "run_id": ("string", "name of the run folder results/<run_id>/ that holds the row"),
    "case_id": ("string", "first 16 hex digits of the SHA-1 of the JSON list of the KEY_FIELDS values; equal cases "
                          "get equal ids in every run"),
    "method": ("string", "registered method name (attnbench list methods)"),
    "family": ("string", "the method's declared family: exact, sparse, linear, hybrid, ..."),
    "exact": ("boolean", "the method declares exact attention: it is gated against the fp32 reference and marked "
                         "wrong above err_tol; approximate methods get a mask-leak probe instead"),
    "mask": ("string", "canonical mask label with every parameter, e.g. sliding_window(left=4096)"),
    "mask_name": ("string", "registered mask name without parameters"),
    "pattern": ("string", "CAB pattern: causal or noncausal (the mask) x self (seq_q == seq_kv) or cross"),
    "batch": ("Int64", "sequences per call"),
    "heads_q": ("Int64", "query heads"),
    "heads_kv": ("Int64", "key/value heads (GQA when fewer than heads_q; heads_q is a multiple of it)"),
    "seq_q": ("Int64", "query length per sequence, tokens (decode: the queries of one step, decode_queries)"),
    "seq_kv": ("Int64", "key/value length per sequence, tokens (decode: the cache length)"),
    "head_dim": ("Int64", "head dimension of q, k and v, elements"),
    "dtype": ("string", "dtype of q, k, v, dout and the output: float32, float16 or bfloat16"),
    "mode": ("string", "what one timed call runs: fwd (forward, no grad), bwd (backward of a retained forward), "
                       "fwd_bwd (forward + backward), decode (one step against a prefilled cache)"),
    "layout": ("string", "single (one device), or the context-parallel strategy"),
    "world_size": ("Int64", "devices the layout spans (1 for single)"),
    "seed": ("Int64", "seed of the generator that draws q, k, v and dout"),
    "status": ("string", "ok, unsupported, wrong, oom, error, crashed or timeout (DESIGN.md section 6)"),
    "reason": ("string", "why, in words, for every status but ok (empty for ok)"),
    "ms_median": ("Float64", "median over the timed repetitions of one call's time, ms"),
    "ms_p20": ("Float64", "20th percentile of the repetition times (linear interpolation), ms"),
    "ms_p80": ("Float64", "80th percentile of the repetition times (linear interpolation), ms"),
    "ms_min": ("Float64", "fastest repetition, ms"),
    "ms_samples": ("string", "every timed repetition's time in run order, ms, 5 significant digits, ';'-separated "
                             "(reps values; attnbench compare tests significance on them)"),
    "reps": ("Int64", "timed repetitions (after warm-up), sized to the timing budget within min_reps..max_reps"),
    "timer": ("string", "cuda_events (CUDA events per call, L2 flushed before each), cuda_graph (replays of a "
                        "captured graph, timed the same way) or perf_counter (CPU wall clock per call)"),
    "compile_s": ("Float64", "wall time of the method's build plus its first call and a synchronize, s (never "
                             "inside ms_*)"),
    "visible_pairs": ("Int64", "(query, key) pairs the mask lets attend, per batch element and head, counted "
                               "exactly"),
    "density": ("Float64", "visible_pairs / (seq_q * seq_kv), in [0, 1]"),
    "flops": ("Float64", "FLOPs of one call: 4 * batch * heads_q * visible_pairs * head_dim, times 1 (fwd, decode), "
                         "2.5 (bwd) or 3.5 (fwd_bwd)"),
    "tflops": ("Float64", "flops / ms_median, TFLOP/s (1e12 FLOP/s; attention-equivalent for approximate "
                          "methods: the exact method's FLOPs over their time)"),
    "bytes_moved": ("Float64", "fewest bytes one call must move, each tensor read or written once: fwd/decode q, "
                               "k, v in and out written; bwd q, k, v, out, dout in and dq, dk, dv written; fwd_bwd "
                               "both; decode counts only the key positions the mask lets the step read; bytes"),
    "gbps": ("Float64", "bytes_moved / ms_median, GB/s (1e9 bytes/s)"),
    "peak_mem_mb": ("Float64", "mem_above_inputs_mb plus the bytes of the case's own inputs (q, k, v or x; dout in "
                               "backward modes; extras, parameters, a decode state) plus resident_mb, MiB (CUDA "
                               "allocator; empty on CPU)"),
    "resident_mb": ("Float64", "what the method's builder allocated and keeps across calls (a dense additive bias, "
                               "a BlockMask, weights), measured as the allocator's growth over the build, before the "
                               "inputs exist; part of peak_mem_mb, MiB (empty on CPU)"),
    "mem_above_inputs_mb": ("Float64", "allocator peak while the mode's work runs once from its inputs (bwd: the "
                                       "forward whose graph it needs, then the backward) minus what was allocated "
                                       "just before (outputs, activations, gradients, workspace), MiB (empty on CPU)"),
    "rel_err": ("Float64", "max over out (query rows with a visible key; a strided sample of rows above "
                           "correctness.ref_full_pairs) and, in backward modes, every gradient (dq, dk, dv, extras, "
                           "parameters) of ||got - ref|| / ||ref|| (Frobenius norms) against the fp32 reference (the "
                           "method's own for approximate methods; above ref_full_pairs the gradients of a prefix, "
                           "flag grads_gated_on_prefix, else none); NaN when got is non-finite"),
    "err_tol": ("Float64", "tolerance of the gate for the tensor that came closest to failing: a constant per dtype, "
                           "output and gradients apart (bench/measure/gate.py TOLERANCE), never widened with length; "
                           "exact methods against the fp32 softmax reference, approximate ones against their own"),
    "approx_err": ("Float64", "approximate methods: ||out - softmax_ref_fp32|| / ||softmax_ref_fp32|| over query rows "
                              "that see a key (distance from exact attention; recorded, never gated)"),
    "attended_pairs": ("Int64", "(query, key) pairs the method attended, summed over batch and query heads (methods "
                                "that report it: routed and sparse ones)"),
    "tflops_attended": ("Float64", "TFLOP/s on attended pairs: 4 * attended_pairs * head_dim * mode factor / time"),
    "phase_ms": ("string", "median ms of phases the method declares, timed alone ('routing=0.41;...')"),
    "routing_share": ("Float64", "routing phase median / whole call median (methods that declare a routing phase)"),
    "profile_top": ("string", "timing.profile_calls > 0: the largest kernels of a call, 'name=µs per call (share %)'; "
                              "bench/measure/profile.py"),
    "profile_kernel_ms": ("Float64", "timing.profile_calls > 0: summed kernel (CPU: top-level operator) time of a "
                                     "call, ms; against ms_median it shows the gaps between launches"),
    "profile_kernels": ("Int64", "timing.profile_calls > 0: distinct kernels (CPU: top-level operators) in a call"),
    "profile_launches": ("Float64", "timing.profile_calls > 0: kernel launches per call"),
    "state_bytes": ("Int64", "recurrent decode: bytes of the state per sequence (batch element)"),
    "sm_clock_mhz": ("Float64", "SM clock read once at the end of the telemetry window (back-to-back calls "
                                "for energy_window_ms after timing), MHz (NVML)"),
    "power_w": ("Float64", "mean board power over the telemetry window from the energy counter, W; where the "
                           "counter is missing, did not tick or is implausible, NVML's power reading at the "
                           "window's end"),
    "temp_c": ("Float64", "GPU temperature at the end of the telemetry window, degrees C"),
    "energy_mj": ("Float64", "energy counter difference over the telemetry window / the calls in it, mJ per call "
                             "(empty when the counter did not tick or implies more than 1.1 x the power limit)"),
    "flags": ("string", "sanity flags, ';'-separated: tflops_above_peak(P), gbps_above_peak(P), "
                        "cuda_graph_fwd_only, cpu_interference(...) (during the timed repetitions the process's threads "
                        "waited for a CPU, summed over threads, more than 10 % of the wall time), "
                        "approx_err_na(different_operator); above correctness.ref_full_pairs in backward modes "
                        "grads_gated_on_prefix(P) (the gradients compared with the reference's on the first P "
                        "positions, with dout 0 after them, and 0 expected there) or grads_not_gated(seq_q*seq_kv>"
                        "ref_full_pairs: why) (not compared: not prefix_closed, cross attention, mask not closed at P, "
                        "prefix P < grad_prefix_min N, an input's token axis unclear)"),
    "device": ("string", "device name as torch reports it (torch.cuda.get_device_name, or cpu); empty where no "
                         "worker reported it (cases the planner marked unsupported, a worker that never started)"),
    "gpu_uuid": ("string", "UUID of the GPU the case ran on, lower-case, without NVML's GPU- prefix (torch's "
                           "device properties); empty on CPU and for rows made before a worker reported it"),
    "gpu_pci_bus_id": ("string", "PCI bus id of that GPU, NVML's DDDDDDDD:BB:DD.0 form; empty where torch and "
                                 "NVML do not give it"),
    "host": ("string", "host name (socket.gethostname) of the machine whose invocation wrote the row"),
    "git_sha": ("string", "commit (HEAD) of the attnbench checkout when the invocation that wrote the row "
                          "started, or ATTNBENCH_GIT_SHA where the checkout has no .git; empty when unknown"),
    "git_dirty": ("boolean", "tracked files differed from that commit when the invocation started (untracked "
                             "files ignored); empty when unknown"),
    "method_options": ("string", "the method's hyper-parameters of the invocation that wrote the row (config "
                                 "method_options.<method>) as JSON with sorted keys; empty when it gave none. Not "
                                 "part of case_id: a resume with other options is refused"),
    "resolved_options": ("string", "the options the method resolved for the case where it chose among code paths "
                                   "(its fn.resolved, e.g. superlinear's query_order and search when `auto`; the "
                                   "delta rules' impl, solve and wy_precision) as JSON with sorted keys; empty for "
                                   "methods that report none and rows made before the column"),
    "invocation": ("Int64", "0-based index into env.json's invocations of the command that wrote the row"),
    "wall_s": ("Float64", "wall time of the case: in the worker from its start to its row; for a worker that "
                          "died or hung, from handing it the case to noticing; 0 for cases the planner marked unsupported; s"),
    "started_at": ("string", "UTC time (ISO 8601, seconds) when the parent handed the case to a worker, or "
                             "recorded it as unsupported"),
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

from attnbench.methods.case import KEY_FIELDS  # noqa: E402,F401  (defined beside the typed Case)


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
