"""Dtypes a method takes can depend on the device: SDPA's flash backend runs fp32 on the CPU flash kernel but
only fp16/bf16 on CUDA (seen on the H200: sdpa_flash float32 rows were ``error`` "No available kernel"). The
planner refuses such a case before any work, for the target device, with the reason in the row."""
from __future__ import annotations

import copy

import pytest
import torch

from attnbench import masks
from attnbench.config import plan as plan_module
from attnbench.config.plan import Case, build_plan, unsupported_reason
from attnbench.execute.train import build_train_plan
from attnbench.methods import METHODS, BuildContext, Capabilities, MaskInfo, Unsupported
from conftest import BASE


def reason_for(method, dtype, device):
    spec = masks.make_mask("full")
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=64,
                seq_kv=64, head_dim=32, dtype=dtype, mode="fwd", device=device)
    options = {"dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32}
    return unsupported_reason(case, spec, METHODS[method].caps, (True, ""), options)


@pytest.mark.parametrize("method", ["sdpa_flash", "latent_xattn_flash"])
def test_flash_backends_refuse_float32_on_cuda_but_not_on_cpu(method):
    reason = reason_for(method, "float32", "cuda:0")
    assert reason == "dtype float32 not supported on cuda (supports float16, bfloat16)"
    assert reason_for(method, "bfloat16", "cuda:0") is None
    assert reason_for(method, "float32", "cpu") is None  # the CPU flash kernel takes fp32


def test_methods_that_take_float32_on_cuda_are_not_refused():
    """Control: the rule is per method (the efficient backend and the math path take fp32 on CUDA)."""
    for method in ("sdpa_efficient", "sdpa_math", "latent_xattn"):
        assert reason_for(method, "float32", "cuda:0") is None, method
    assert reason_for("sdpa_cudnn", "float32", "cuda:0") == "dtype float32 not supported (supports float16, bfloat16)"


def test_the_kernel_planner_refuses_sdpa_flash_float32_for_a_cuda_target(monkeypatch):
    monkeypatch.setattr(plan_module, "resolve_devices", lambda cfg: ["cuda:0"])
    monkeypatch.setattr(plan_module, "device_memory_bytes", lambda device: None)
    cfg = copy.deepcopy(BASE)
    cfg.update(methods=["sdpa_flash", "sdpa_math"], dtype=["float32", "bfloat16"])
    plan = build_plan(cfg)
    refused = {(c.method, c.dtype): r for c, r in plan.unsupported}
    runnable = {(c.method, c.dtype) for c in plan.runnable}
    assert "not supported on cuda" in refused[("sdpa_flash", "float32")]
    assert ("sdpa_flash", "bfloat16") in runnable and ("sdpa_math", "float32") in runnable


def test_the_train_planner_refuses_sdpa_flash_float32_for_a_cuda_target():
    tiny = dict(d_model=16, heads=2, layers=1, batch=4, steps=3, eval_batches=1, warmup=1)
    cfg = {"tasks": ["sort"], "methods": ["sdpa_flash", "sdpa_math"], "seeds": [0], "dtype": "float32",
           "device": "cuda", "task_options": {"sort": {**tiny, "seq_lens": [16]}}}
    plan = build_train_plan(cfg, target_device="cuda", check_availability=False)
    refused = {c.method: r for c, r in plan.unsupported}
    assert "dtype float32 not supported on cuda" in refused["sdpa_flash"]
    assert {c.method for c in plan.runnable} == {"sdpa_math"}
    here = build_train_plan({**cfg, "device": "cpu"}, target_device="cpu")
    assert {c.method for c in here.runnable} == {"sdpa_flash", "sdpa_math"}


def test_dtypes_by_device_is_validated_and_hashable():
    caps = Capabilities(dtypes_by_device={"cuda": ("bfloat16",)})
    assert caps.dtypes_on("cuda") == ("bfloat16",) and caps.dtypes_on("cpu") == caps.dtypes
    hash(caps)
    with pytest.raises(ValueError, match="dtypes_by_device"):
        Capabilities(dtypes_by_device={"cuda": "bfloat16"})


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_halo_pinned_to_a_half_precision_backend_refuses_float32_on_cuda(backend):
    """halo's ``backend`` option pins SDPA's backend of the strided path; flash/cuDNN take no fp32 on CUDA."""
    spec = masks.make_mask("full")
    case = Case(method="halo", mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=128,
                seq_kv=128, head_dim=16, dtype="float32", mode="fwd", seed=0)
    bound = spec.bind(128, 128)

    def build(device, params):
        ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device(device),
                           dtype=torch.float32, params=params)
        return METHODS["halo"].build(ctx)

    with pytest.raises(Unsupported, match="method_options.halo.backend"):
        build("cuda", {"block": 16, "halo": 8, "backend": backend})  # refused before anything touches the GPU
    build("cpu", {"block": 16, "halo": 8, "backend": backend})  # control: the CPU runs it
    build("cuda", {"block": 16, "halo": 8, "backend": backend, "impl": "gather"})  # backend unused there
