"""GPU telemetry through NVML (pynvml): SM clock, power, temperature and the energy counter.

Every reading is optional: on a CPU, without NVML, or where the GPU withholds a counter, the value is None
and the row's column stays empty.

Which NVML device is ``cuda:i``? Not NVML index ``i``: CUDA numbers only the devices in
``CUDA_VISIBLE_DEVICES`` (``1,0`` makes ``cuda:0`` the second GPU), and by default orders them fastest first,
while NVML numbers every GPU in PCI order. ``match_nvml`` finds the handle by the device's UUID, else by its
PCI bus id, both from torch; when torch offers neither, it takes NVML's only device if there is exactly one,
else it gives up and says why (telemetry stays empty rather than reading another GPU).
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

    def __init__(self, nvml, handle, match: "NvmlMatch | None" = None):
        self.nvml, self.handle, self.match = nvml, handle, match

    @classmethod
    def open(cls, device_index: int) -> "Telemetry | None":
        """The sensors of CUDA device ``device_index`` (torch's numbering), or None where NVML is missing or the
        device cannot be matched to an NVML handle (``match_nvml(...).reason`` says why)."""
        nvml = _nvml()
        if nvml is None:
            return None
        match = match_nvml(nvml, device_index)
        return None if match.handle is None else cls(nvml, match.handle, match)

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


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def normalize_uuid(uuid) -> str | None:
    """A GPU UUID without NVML's ``GPU-``/``MIG-`` prefix, lower case (torch prints it bare, NVML prefixed)."""
    text = _text(uuid)
    if not text:
        return None
    text = str(text).strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text or None


def format_bus_id(domain: int, bus: int, device: int) -> str:
    """NVML's PCI bus id form, ``DDDDDDDD:BB:DD.0`` (upper-case hex)."""
    return f"{int(domain):08X}:{int(bus):02X}:{int(device):02X}.0"


def _bus_key(bus_id) -> str | None:
    """A PCI bus id reduced to domain:bus:device (NVML writes 8 domain digits, other tools 4)."""
    text = _text(bus_id)
    if not text:
        return None
    try:
        domain, bus, rest = str(text).strip().split(":")
        return f"{int(domain, 16):x}:{int(bus, 16):x}:{int(rest.split('.')[0], 16):x}"
    except ValueError:
        return None


def torch_identity(device_index: int, props=None) -> dict:
    """UUID, PCI bus id and name of CUDA device ``device_index`` as torch sees it (None where torch does not say).

    ``props``: ``torch.cuda.get_device_properties(device_index)`` (tests pass a stand-in)."""
    if props is None:
        import torch

        props = torch.cuda.get_device_properties(device_index)
    uuid = getattr(props, "uuid", None)
    ids = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    bus_id = format_bus_id(*ids) if all(isinstance(i, int) for i in ids) else None
    return {"name": getattr(props, "name", None), "uuid": normalize_uuid(str(uuid)) if uuid is not None else None,
            "pci_bus_id": bus_id}


@dataclass
class NvmlMatch:
    """The NVML device of one CUDA device: its handle (None when unmatched), how it was matched (``uuid``,
    ``pci_bus_id``, ``only_device``), and why not when it was not."""

    handle: object | None
    nvml_index: int | None
    how: str | None
    reason: str | None
    uuid: str | None = None
    pci_bus_id: str | None = None

    def as_dict(self) -> dict:
        return {"nvml_index": self.nvml_index, "nvml_match": self.how, "telemetry_reason": self.reason,
                "uuid": self.uuid, "pci_bus_id": self.pci_bus_id}


def match_nvml(nvml, device_index: int, identity: dict | None = None) -> NvmlMatch:
    """Find CUDA device ``device_index``'s NVML handle by UUID, else PCI bus id, never by index alone (module
    docstring). ``identity``: ``torch_identity(device_index)`` (computed when not given)."""
    if identity is None:
        try:
            identity = torch_identity(device_index)
        except Exception as exc:  # noqa: BLE001 - no torch device properties: nothing to match on
            identity = {"uuid": None, "pci_bus_id": None, "error": f"{type(exc).__name__}: {exc}"}
    uuid, bus_id = identity.get("uuid"), identity.get("pci_bus_id")
    count = _try(nvml.nvmlDeviceGetCount)
    if not count:
        return NvmlMatch(None, None, None, "NVML lists no device", uuid, bus_id)
    devices = []
    for index in range(count):
        handle = _try(nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is not None:
            devices.append((index, handle))
    if uuid:
        for index, handle in devices:
            if normalize_uuid(_try(nvml.nvmlDeviceGetUUID, handle)) == uuid:
                return NvmlMatch(handle, index, "uuid", None, uuid, bus_id)
    if bus_id:
        for index, handle in devices:
            info = _try(nvml.nvmlDeviceGetPciInfo, handle)
            nvml_bus = None if info is None else (_text(getattr(info, "busId", None)) or _text(getattr(info, "busIdLegacy", None)))
            if nvml_bus is not None and _bus_key(nvml_bus) == _bus_key(bus_id):
                return NvmlMatch(handle, index, "pci_bus_id", None, uuid, bus_id)
    tried = ", ".join(f"{k} {v}" for k, v in (("UUID", uuid), ("PCI bus id", bus_id)) if v)
    if tried:
        return NvmlMatch(None, None, None, f"no NVML device has cuda:{device_index}'s {tried}", uuid, bus_id)
    if len(devices) == 1:
        return NvmlMatch(devices[0][1], devices[0][0], "only_device", None, uuid, bus_id)
    return NvmlMatch(None, None, None,
                     f"torch gives no UUID or PCI bus id for cuda:{device_index} and NVML lists {len(devices)} "
                     f"devices: telemetry off rather than read a GPU that may be another one", uuid, bus_id)


def device_identity(device: str) -> dict:
    """What a row records about the device it ran on: name, UUID, PCI bus id and how NVML was matched
    (``nvml_index``, ``nvml_match``, ``telemetry_reason``). A CPU device gives ``{"name": "cpu"}``."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return {"name": "cpu"}
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    try:
        identity = torch_identity(index)
    except Exception as exc:  # noqa: BLE001 - the row goes without the GPU's identity, and says why
        return {"name": None, "uuid": None, "pci_bus_id": None, "nvml_index": None, "nvml_match": None,
                "telemetry_reason": f"no device properties from torch: {type(exc).__name__}: {exc}"}
    nvml = _nvml()
    if nvml is None:
        return {**identity, "nvml_index": None, "nvml_match": None, "telemetry_reason": "NVML unavailable"}
    match = match_nvml(nvml, index, identity)
    if identity.get("uuid") is None and match.handle is not None:  # fill the UUID from NVML when torch lacked it
        identity["uuid"] = normalize_uuid(_try(nvml.nvmlDeviceGetUUID, match.handle))
    return {**identity, **{k: v for k, v in match.as_dict().items() if k not in ("uuid", "pci_bus_id")}}


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
            "index": i,  # NVML's index (PCI order, every GPU), not the CUDA index
            "name": name.decode() if isinstance(name, bytes) else name,
            "uuid": normalize_uuid(_try(nvml.nvmlDeviceGetUUID, h)),
            "pci_bus_id": _text(getattr(_try(nvml.nvmlDeviceGetPciInfo, h), "busId", None)),
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
