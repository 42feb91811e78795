"""Device ceilings, measured once per device and cached: bf16 matmul rate and device-to-device copy bandwidth.

The report divides achieved throughput by these measured numbers (not by datasheet peaks). The cache lives
in ``~/.cache/attnbench/calibration.json`` keyed by GPU name, driver and torch version; every run records
the numbers it used in env.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from attnbench.record.envinfo import now
from attnbench.measure.timing import time_cuda

CACHE = Path(os.environ.get("ATTNBENCH_CACHE", Path.home() / ".cache" / "attnbench")) / "calibration.json"
TIMING = {"budget_ms": 300.0, "warmup_ms": 50.0, "min_reps": 10, "max_reps": 200, "flush_l2": True}


def _key(device) -> str:
    return f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}|cuda {torch.version.cuda}"


def measure(device, size: int = 8192, copy_bytes: int = 1 << 30) -> dict:
    """Median bf16 matmul TFLOP/s (``size``^3, random data) and copy TB/s (bytes read + written)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    matmul = time_cuda(lambda: torch.mm(a, b), device, TIMING)
    del a, b
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy = time_cuda(lambda: dst.copy_(src), device, TIMING)
    del src, dst
    return {
        "matmul_bf16_tflops": 2 * size**3 / (matmul.ms_median * 1e-3) / 1e12,
        "copy_tbps": 2 * copy_bytes / (copy.ms_median * 1e-3) / 1e12,
        "measured_at": now(),
        "matmul_ms_p20_p80": [matmul.ms_p20, matmul.ms_p80],
        "copy_ms_p20_p80": [copy.ms_p20, copy.ms_p80],
    }


def calibration(device, refresh: bool = False) -> dict:
    """The cached calibration for ``device``, measuring it first when absent (or ``refresh``)."""
    key = _key(device)
    cache = {}
    if CACHE.is_file():
        try:
            cache = json.loads(CACHE.read_text())
        except (OSError, ValueError):
            cache = {}
    if refresh or key not in cache:
        cache[key] = {**measure(device), "key": key}
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass
        cache[key]["source"] = "measured"
    else:
        cache[key]["source"] = f"cached ({CACHE})"
    return cache[key]
