"""Where a case's time goes: its timed call under ``torch.profiler``, summed per kernel (``timing.profile_calls``).

After the timed repetitions, ``profile_calls`` more calls run under the profiler (GPU kernels on CUDA, operators
on the CPU). Each kernel's device time is summed over the calls and divided by their number; the row gets
``profile_top`` ("name=µs per call (share %)" for the largest, ``;``-separated), ``profile_kernel_ms`` (the summed
kernel time of a call), ``profile_kernels`` (distinct kernels seen) and ``profile_launches`` (launches per call: a launch-bound method shows many small ones). The
profiled calls are not the timed ones: the profiler's own overhead never reaches ``ms_median``.

Names are shortened (templates and argument lists dropped) so that a table stays readable; the share is of the
summed kernel time, not of the call's wall time (gaps between launches are in neither).
"""
from __future__ import annotations

import re
from collections import defaultdict

TOP = 6
NAME_CHARS = 60


def short_name(name: str) -> str:
    """A kernel's name without template arguments, argument lists or ``void``: readable in a table cell."""
    name = re.sub(r"^void\s+", "", name.strip())
    depth, out = 0, []
    for char in name:  # drop <...> at any depth
        if char == "<":
            depth += 1
        elif char == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(char)
    name = "".join(out).split("(")[0].strip()
    name = name.replace(";", ",").replace("=", ":")  # the cell's own separators
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"


def summarize(events: list[tuple[str, float]], calls: int) -> dict:
    """Row columns from (kernel name, device µs) events of ``calls`` calls."""
    if calls < 1:
        raise ValueError("calls must be >= 1")
    total: dict[str, float] = defaultdict(float)
    for name, us in events:
        total[short_name(name)] += us
    whole = sum(total.values())
    ranked = sorted(total.items(), key=lambda item: -item[1])
    top = ";".join(f"{name}={us / calls:.4g}us ({100 * us / whole:.0f}%)" for name, us in ranked[:TOP]) if whole else ""
    return {"profile_top": top or None, "profile_kernels": len(total), "profile_launches": len(events) / calls,
            "profile_kernel_ms": whole / calls / 1e3 if whole else None}  # no kernel seen: not a 0 ms measurement


def profile_call(call, device, calls: int) -> dict:
    """Run ``call`` ``calls`` times under torch.profiler; the row columns of :func:`summarize`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize(device)
    events = []
    for event in prof.events():
        kind = getattr(event, "device_type", None)
        if cuda:
            if kind != torch.autograd.DeviceType.CUDA:
                continue
            us = event.device_time if hasattr(event, "device_time") else event.cuda_time
        else:
            # top-level operators only (their children are inside them): the CPU's "kernels"
            if event.cpu_parent is not None or kind != torch.autograd.DeviceType.CPU:
                continue
            us = event.cpu_time_total
        events.append((event.name, float(us)))
    return summarize(events, calls)
