"""Timers: CUDA events with an L2 flush between repetitions (optionally CUDA-graph replay), or perf_counter.

``time_callable(fn, device, timing)`` warms up, sizes the repetition count to the time budget, and returns
``Timing`` (median, p20, p80, min in ms, repetitions, timer name). Nothing here allocates inside the timed
region: the flush buffer is made once per process.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 << 20
_flush_buffers: dict[str, torch.Tensor] = {}


@dataclass
class Timing:
    ms_median: float
    ms_p20: float
    ms_p80: float
    ms_min: float
    reps: int
    timer: str
    samples: list


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms: list[float], timer: str) -> Timing:
    ordered = sorted(samples_ms)
    return Timing(
        ms_median=statistics.median(ordered),
        ms_p20=_quantile(ordered, 0.2),
        ms_p80=_quantile(ordered, 0.8),
        ms_min=ordered[0],
        reps=len(ordered),
        timer=timer,
        samples=samples_ms,
    )


def flush_buffer(device) -> torch.Tensor:
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _flush_buffers[key]


def _reps_for(estimate_ms: float, timing: dict) -> int:
    reps = int(timing["budget_ms"] / max(estimate_ms, 1e-3))
    return max(timing["min_reps"], min(timing["max_reps"], reps))


def time_cpu(fn, timing: dict) -> Timing:
    deadline = time.perf_counter() + timing["warmup_ms"] / 1e3
    start = time.perf_counter()
    fn()
    estimate_ms = (time.perf_counter() - start) * 1e3
    while time.perf_counter() < deadline:
        fn()
    samples = []
    for _ in range(_reps_for(estimate_ms, timing)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples, "perf_counter")


def _estimate_cuda_ms(fn, device, warmup_ms: float) -> float:
    """Warm up for ``warmup_ms`` (at least 2 calls) and return the mean call time, ms."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize(device)
    calls, elapsed = 0, 0.0
    while calls < 2 or elapsed < warmup_ms:
        start.record()
        fn()
        end.record()
        end.synchronize()
        elapsed += start.elapsed_time(end)
        calls += 1
        if calls >= 1000:
            break
    return elapsed / calls


def time_cuda(fn, device, timing: dict) -> Timing:
    """CUDA events around each call; the L2 is flushed (a 256 MiB write) before each one."""
    estimate_ms = _estimate_cuda_ms(fn, device, timing["warmup_ms"])
    reps = _reps_for(estimate_ms, timing)
    flush = flush_buffer(device) if timing["flush_l2"] else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for i in range(reps):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda_events")


def time_cuda_graph(fn, device, timing: dict) -> Timing:
    """Capture ``fn`` once in a CUDA graph and time its replays (flush outside the graph)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    result = time_cuda(graph.replay, device, timing)
    result.timer = "cuda_graph"
    return result


def time_callable(fn, device, timing: dict, allow_graph: bool = True) -> Timing:
    device = torch.device(device)
    if device.type != "cuda":
        return time_cpu(fn, timing)
    if timing.get("cuda_graph") and allow_graph:
        return time_cuda_graph(fn, device, timing)
    return time_cuda(fn, device, timing)
