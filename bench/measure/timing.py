"""Timers: CUDA events with an L2 flush between repetitions (optionally CUDA-graph replay), or perf_counter.

``time_callable(fn, device, timing)`` warms up, sizes the repetition count to the time budget, and returns
``Timing`` (median, p20, p80, min in ms, repetitions, timer name, every repetition's time, and flags). Nothing
here allocates inside the timed region: the flush buffer is made once per process.

Interference: a process that shares the CPU with another one is descheduled, and a CPU timing (or a
launch-bound GPU timing) then measures the other process. ``CpuProbe`` reads, around the timed repetitions,
how long this process's threads waited on the run queue (runnable, no CPU free: ``/proc/self/task/*/schedstat``)
and its CPU time; a wait above ``INTERFERENCE_WAIT_FRACTION`` of the wall time flags the timing
``cpu_interference(...)``. Without schedstat, CPU time under ``INTERFERENCE_CPU_FRACTION`` of the wall time
does. The row stays ``ok``: the flag says its time is not the kernel's alone.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import torch

L2_FLUSH_BYTES = 256 << 20
# run-queue wait of this process's threads, as a fraction of the timed wall time, above which a timing is flagged
INTERFERENCE_WAIT_FRACTION = 0.10
# without schedstat: process CPU time below this fraction of the wall time (the process was off the CPU)
INTERFERENCE_CPU_FRACTION = 0.5
SAMPLE_DIGITS = 5  # significant digits of each repetition's time in the ms_samples column
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
    flags: list = field(default_factory=list)

    def columns(self) -> dict:
        """The row's timing columns (schema names)."""
        return {"ms_median": self.ms_median, "ms_p20": self.ms_p20, "ms_p80": self.ms_p80, "ms_min": self.ms_min,
                "reps": self.reps, "timer": self.timer, "ms_samples": format_samples(self.samples)}


def format_samples(samples_ms) -> str | None:
    """Repetition times (ms, run order) as the ``ms_samples`` text: ';'-separated, ``SAMPLE_DIGITS`` digits."""
    if samples_ms is None or len(samples_ms) == 0:
        return None
    return ";".join(f"{float(x):.{SAMPLE_DIGITS}g}" for x in samples_ms)


def parse_samples(text) -> list[float]:
    """The ``ms_samples`` text back as floats; [] for an empty or missing value."""
    if text is None or not isinstance(text, str) or not text.strip():
        return []
    return [float(x) for x in text.split(";") if x.strip()]


def _runqueue_wait_ns() -> int | None:
    """Nanoseconds this process's threads have spent runnable but waiting for a CPU (sum over live threads),
    or None where the kernel does not expose schedstat."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
        for tid in tasks:
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as handle:
                    total += int(handle.read().split()[1])
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
    except (OSError, ValueError, IndexError):
        return None
    return total


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class CpuProbe:
    """Counters around a timed region: wall time, process CPU time, run-queue wait of the process's threads.
    ``flag()`` after the region: ``cpu_interference(...)`` when the process was kept off the CPU, else None."""

    def __init__(self, cpu_rule: bool = True):
        """``cpu_rule``: judge by CPU time when schedstat is missing (off for GPU timing, where the host may
        sleep in a blocking synchronize)."""
        self.cpu_rule = cpu_rule
        self.wall0, self.cpu0, self.wait0 = time.perf_counter(), time.process_time(), _runqueue_wait_ns()

    def measure(self) -> dict:
        wall = time.perf_counter() - self.wall0
        cpu = time.process_time() - self.cpu0
        wait1 = _runqueue_wait_ns()
        wait = None if self.wait0 is None or wait1 is None else max(0, wait1 - self.wait0) / 1e9
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = None
        return {"wall_s": wall, "cpu_s": cpu, "wait_s": wait, "load1": load, "cpus": _cpus()}

    def flag(self) -> str | None:
        counters = self.measure()
        if counters["wait_s"] is None and not self.cpu_rule:
            return None
        return interference_flag(**counters)


def interference_flag(wall_s: float, cpu_s: float, wait_s: float | None, load1: float | None, cpus: int) -> str | None:
    """The ``cpu_interference(...)`` flag for counters of a timed region, or None when it ran undisturbed.

    With ``wait_s`` (run-queue wait summed over the threads): flagged above ``INTERFERENCE_WAIT_FRACTION`` of
    ``wall_s``. Without it: flagged when ``cpu_s`` is under ``INTERFERENCE_CPU_FRACTION`` of ``wall_s``. The
    1-minute load average and the usable CPUs are reported in the flag, not judged (the load lags by a minute
    and counts this process too)."""
    if wall_s <= 0:
        return None
    load = "" if load1 is None else f", load {load1:.1f} on {cpus} cpus"
    if wait_s is not None:
        if wait_s / wall_s > INTERFERENCE_WAIT_FRACTION:
            return f"cpu_interference(run-queue wait {wait_s / wall_s:.0%} of wall{load})"
        return None
    if cpu_s / wall_s < INTERFERENCE_CPU_FRACTION:
        return f"cpu_interference(cpu time {cpu_s / wall_s:.0%} of wall{load})"
    return None


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
    probe = CpuProbe()
    for _ in range(_reps_for(estimate_ms, timing)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return _flagged(summarize(samples, "perf_counter"), probe)


def _flagged(result: Timing, probe: CpuProbe) -> Timing:
    flag = probe.flag()
    if flag:
        result.flags.append(flag)
    return result


LONG_CALL_MS = 1000.0
"""``timing.long_call_ms`` default: a primed call at least this long is timed once (L2 flushed before it, as every
repetition) and that measurement is the first repetition, not a separate warm-up estimate (:func:`time_cuda`)."""


def _estimate_cuda_ms(fn, device, warmup_ms: float, primed: bool = False, done: tuple = (0.0, 0)) -> float:
    """Warm up for ``warmup_ms`` and return the mean call time, ms: an untimed call first (unless ``primed``: the
    caller has just run ``fn``, as the case runner's memory phase does), then timed calls until ``warmup_ms`` is
    spent, at least one. A call longer than the warm-up budget is not repeated: at 1M tokens one call takes
    seconds (flex causal ~12 s), and two warm-up calls more than the budget asks for decided whether a case fit
    its time limit. ``done``: (ms, calls) of timed warm-up calls already made (:func:`time_cuda`'s first call)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if not primed:
        fn()
    torch.cuda.synchronize(device)
    elapsed, calls = float(done[0]), int(done[1])
    while calls < 1 or elapsed < warmup_ms:
        start.record()
        fn()
        end.record()
        end.synchronize()
        elapsed += start.elapsed_time(end)
        calls += 1
        if calls >= 1000:
            break
    return elapsed / calls


def _repetitions(fn, device, flush, reps: int) -> list[float]:
    """``reps`` calls, each with CUDA events around it and the L2 flushed (``flush``) before it."""
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
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_cuda(fn, device, timing: dict, primed: bool = False) -> Timing:
    """CUDA events around each call; the L2 is flushed (a 256 MiB write) before each one. ``primed``: ``fn`` has
    just run (no untimed warm-up call needed); then the first warm-up call is timed as a repetition is, and if it
    took at least ``timing.long_call_ms`` (default :data:`LONG_CALL_MS`; 0: off) it is the first repetition (the
    row's ``flags`` say ``first_call_as_sample``): a 1M-token dense fwd_bwd call takes ~1 min, and a warm-up
    estimate apart from the repetitions cost one such call more per case."""
    flush = flush_buffer(device) if timing["flush_l2"] else None
    long_ms = float(timing.get("long_call_ms", LONG_CALL_MS) or 0.0)
    if primed and long_ms > 0:
        probe = CpuProbe(cpu_rule=False)  # around every timed call that may become a repetition
        first_ms = _repetitions(fn, device, flush, 1)[0]
        if first_ms >= long_ms:
            samples = [first_ms] + _repetitions(fn, device, flush, _reps_for(first_ms, timing) - 1)
            result = _flagged(summarize(samples, "cuda_events"), probe)
            result.flags.append("first_call_as_sample")
            return result
        estimate_ms = _estimate_cuda_ms(fn, device, timing["warmup_ms"], primed, done=(first_ms, 1))
    else:
        estimate_ms = _estimate_cuda_ms(fn, device, timing["warmup_ms"], primed)
    reps = _reps_for(estimate_ms, timing)
    probe = CpuProbe(cpu_rule=False)  # a descheduled host delays the launches of a launch-bound call
    return _flagged(summarize(_repetitions(fn, device, flush, reps), "cuda_events"), probe)


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


def time_callable(fn, device, timing: dict, allow_graph: bool = True, primed: bool = False) -> Timing:
    """``primed``: the caller ran ``fn`` just before (CUDA events only; the CPU timer and graph capture keep
    their own warm-up)."""
    device = torch.device(device)
    if device.type != "cuda":
        return time_cpu(fn, timing)
    if timing.get("cuda_graph") and allow_graph:
        return time_cuda_graph(fn, device, timing)
    return time_cuda(fn, device, timing, primed)
