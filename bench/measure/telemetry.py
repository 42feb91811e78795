"""GPU telemetry through NVML (pynvml): SM clock, power, temperature and the energy counter.

Every reading is optional: on a CPU, without NVML, or where the GPU withholds a counter, the value is None
and the row's column stays empty.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no NVML library, no driver: telemetry is simply absent
        return None


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


@dataclass
class Reading:
    sm_clock_mhz: float | None
    power_w: float | None
    temp_c: float | None
    energy_mj: float | None  # cumulative counter
    t: float


class Telemetry:
    """Reads one GPU's sensors. ``Telemetry.open(index)`` returns None where NVML is unavailable."""

    def __init__(self, nvml, handle):
        self.nvml, self.handle = nvml, handle

    @classmethod
    def open(cls, device_index: int) -> "Telemetry | None":
        nvml = _nvml()
        if nvml is None:
            return None
        handle = _try(nvml.nvmlDeviceGetHandleByIndex, device_index)
        return None if handle is None else cls(nvml, handle)

    def power_limit_w(self) -> float | None:
        limit = _try(self.nvml.nvmlDeviceGetPowerManagementLimit, self.handle)
        return None if limit is None else limit / 1000.0

    def read(self) -> Reading:
        n, h = self.nvml, self.handle
        power = _try(n.nvmlDeviceGetPowerUsage, h)
        energy = _try(n.nvmlDeviceGetTotalEnergyConsumption, h)
        clock = _try(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM)
        temp = _try(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU)
        return Reading(
            sm_clock_mhz=None if clock is None else float(clock),
            power_w=None if power is None else power / 1000.0,
            temp_c=None if temp is None else float(temp),
            energy_mj=None if energy is None else float(energy),
            t=time.perf_counter(),
        )


def gpu_inventory() -> list[dict]:
    """Static facts of every visible GPU, for env.json."""
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    count = _try(nvml.nvmlDeviceGetCount) or 0
    for i in range(count):
        h = _try(nvml.nvmlDeviceGetHandleByIndex, i)
        if h is None:
            continue
        name = _try(nvml.nvmlDeviceGetName, h)
        mem = _try(nvml.nvmlDeviceGetMemoryInfo, h)
        limit = _try(nvml.nvmlDeviceGetPowerManagementLimit, h)
        out.append({
            "index": i,
            "name": name.decode() if isinstance(name, bytes) else name,
            "memory_mb": None if mem is None else mem.total / 2**20,
            "sm_clock_max_mhz": _try(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_SM),
            "mem_clock_max_mhz": _try(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_MEM),
            "sm_clock_mhz": _try(nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_SM),
            "power_limit_w": None if limit is None else limit / 1000.0,
            "temp_c": _try(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU),
        })
    driver = _try(nvml.nvmlSystemGetDriverVersion)
    for gpu in out:
        gpu["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    return out
