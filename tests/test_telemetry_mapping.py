"""NVML telemetry reads the GPU that torch runs on, not the GPU with the same index (CUDA_VISIBLE_DEVICES)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from attnbench.measure import telemetry as telemetry

# two GPUs in NVML's (PCI) order; each one's power tells which handle a reading came from
NVML_GPUS = [
    {"uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "bus": (0, 0x19, 0), "power_mw": 100_000, "name": "H200 #0"},
    {"uuid": "GPU-bbbbbbbb-1111-1111-1111-111111111111", "bus": (0, 0x3B, 0), "power_mw": 200_000, "name": "H200 #1"},
]


def fake_pynvml(gpus=NVML_GPUS) -> types.ModuleType:
    """A pynvml stand-in with ``gpus`` (NVML index = list position)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_TEMPERATURE_GPU = 1, 2, 0
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    nvml.nvmlDeviceGetUUID = lambda h: gpus[h[1]]["uuid"]
    nvml.nvmlDeviceGetName = lambda h: gpus[h[1]]["name"]

    def pci_info(h):
        domain, bus, device = gpus[h[1]]["bus"]
        return types.SimpleNamespace(busId=f"{domain:08X}:{bus:02X}:{device:02X}.0".encode(), domain=domain, bus=bus,
                                     device=device)

    nvml.nvmlDeviceGetPciInfo = pci_info
    nvml.nvmlDeviceGetPowerUsage = lambda h: gpus[h[1]]["power_mw"]
    nvml.nvmlDeviceGetPowerManagementLimit = lambda h: 700_000
    nvml.nvmlDeviceGetClockInfo = lambda h, kind: 1980
    nvml.nvmlDeviceGetTemperature = lambda h, kind: 40 + h[1]

    def unsupported(*args):
        raise RuntimeError("not supported")

    nvml.nvmlDeviceGetTotalEnergyConsumption = unsupported
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=141 * 2**30)
    nvml.nvmlDeviceGetMaxClockInfo = lambda h, kind: 1980
    nvml.nvmlSystemGetDriverVersion = lambda: "580.00"
    return nvml


def fake_properties(visible: str, gpus=NVML_GPUS, with_uuid=True, with_bus=True):
    """torch.cuda.get_device_properties as CUDA would answer under CUDA_VISIBLE_DEVICES=``visible``."""
    order = [int(i) for i in visible.split(",")]

    def get(index):
        gpu = gpus[order[index]]
        props = types.SimpleNamespace(name=gpu["name"])
        if with_uuid:
            props.uuid = gpu["uuid"].removeprefix("GPU-")  # torch prints the UUID bare
        if with_bus:
            props.pci_domain_id, props.pci_bus_id, props.pci_device_id = gpu["bus"]
        return props

    return get


@pytest.fixture
def remapped(monkeypatch):
    """Two fake GPUs, CUDA_VISIBLE_DEVICES=1,0: cuda:0 is NVML's device 1 and cuda:1 is NVML's device 0."""
    def install(**props):
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
        monkeypatch.setattr(torch.cuda, "get_device_properties", fake_properties("1,0", **props))
    return install


@pytest.mark.parametrize("props", [{}, {"with_uuid": False}], ids=["by-uuid", "by-pci-bus-id"])
def test_telemetry_of_cuda0_reads_the_gpu_cuda0_is_under_a_remapped_order(remapped, props):
    remapped(**props)
    first, second = telemetry.Telemetry.open(0), telemetry.Telemetry.open(1)
    assert first.read().power_w == 200.0 and first.match.nvml_index == 1  # NVML device 1, not device 0
    assert second.read().power_w == 100.0 and second.match.nvml_index == 0
    assert first.match.how == ("uuid" if props == {} else "pci_bus_id")


def test_without_uuid_or_bus_id_telemetry_is_off_and_says_why(remapped):
    remapped(with_uuid=False, with_bus=False)
    assert telemetry.Telemetry.open(0) is None  # never NVML index 0: that may be another GPU
    match = telemetry.match_nvml(sys.modules["pynvml"], 0)
    assert match.handle is None and "no UUID or PCI bus id" in match.reason and "2 devices" in match.reason


def test_a_single_gpu_is_matched_without_an_id_and_the_match_is_recorded(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(NVML_GPUS[1:]))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        fake_properties("0", NVML_GPUS[1:], with_uuid=False, with_bus=False))
    opened = telemetry.Telemetry.open(0)
    assert opened.match.how == "only_device" and opened.read().power_w == 200.0


def test_an_unknown_uuid_is_not_matched_by_index(remapped, monkeypatch):
    remapped()
    other = [dict(g, uuid="GPU-cccccccc-2222-2222-2222-222222222222", bus=(0, 0x99, 0)) for g in NVML_GPUS]
    monkeypatch.setattr(torch.cuda, "get_device_properties", fake_properties("1,0", other))
    assert telemetry.Telemetry.open(0) is None
    match = telemetry.match_nvml(sys.modules["pynvml"], 0)
    assert "no NVML device has cuda:0's UUID cccccccc" in match.reason


def test_device_identity_names_the_gpu_and_its_nvml_match(remapped, monkeypatch):
    remapped()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    identity = telemetry.device_identity("cuda:0")
    assert identity["uuid"] == "bbbbbbbb-1111-1111-1111-111111111111"
    assert identity["pci_bus_id"] == "00000000:3B:00.0" and identity["name"] == "H200 #1"
    assert identity["nvml_index"] == 1 and identity["nvml_match"] == "uuid" and identity["telemetry_reason"] is None
    assert telemetry.device_identity("cpu") == {"name": "cpu"}


def test_gpu_inventory_records_uuid_and_bus_id(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    inventory = telemetry.gpu_inventory()
    assert [g["uuid"] for g in inventory] == ["aaaaaaaa-0000-0000-0000-000000000000",
                                              "bbbbbbbb-1111-1111-1111-111111111111"]
    assert inventory[1]["pci_bus_id"] == "00000000:3B:00.0"


PROBE = """
import json, pynvml
from attnbench.measure.telemetry import Telemetry, device_identity
pynvml.nvmlInit()
uuids = [pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
uuids = [u.decode() if isinstance(u, bytes) else u for u in uuids]
print(json.dumps({"identity": device_identity("cuda:0"), "nvml_uuids": uuids,
                  "opened": Telemetry.open(0).match.nvml_index}))
"""


@pytest.mark.gpu
def test_remapped_visible_devices_on_a_real_two_gpu_machine():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="1,0", CUDA_DEVICE_ORDER="PCI_BUS_ID")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # under CUDA_VISIBLE_DEVICES=1,0 (PCI order), cuda:0 is the second GPU in NVML's PCI order
    assert found["identity"]["nvml_index"] == 1 and found["opened"] == 1
    assert telemetry.normalize_uuid(found["nvml_uuids"][1]) == found["identity"]["uuid"]
