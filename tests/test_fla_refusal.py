"""fla's refusal of its gated backward on Hopper with Triton >= 3.4, < 3.7.1, decided before any work from fla's
own flags (methods/linear/fla_backends.py gated_refusal): a fake ``fla.ops.common.chunk_o`` stands in for fla
(not installed on the CPU machine); the case's device only needs to be a CUDA device name."""
from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest

from attnbench.methods import Unsupported
from attnbench.methods.linear import fla_backends


@pytest.fixture
def fake_fla(monkeypatch):
    def install(hopper, above_3_4, above_3_7_1):
        chunk_o = types.ModuleType("fla.ops.common.chunk_o")
        chunk_o.IS_NVIDIA_HOPPER, chunk_o.TRITON_ABOVE_3_4_0, chunk_o.TRITON_ABOVE_3_7_1 = hopper, above_3_4, above_3_7_1
        common = types.ModuleType("fla.ops.common")
        common.chunk_o = chunk_o
        for name, module in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops")),
                             ("fla.ops.common", common), ("fla.ops.common.chunk_o", chunk_o)):
            monkeypatch.setitem(sys.modules, name, module)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tilelang" else real(name, *a))
    return install


def _ctx(mode, device="cuda:0"):
    return SimpleNamespace(case=SimpleNamespace(mode=mode, method="fla_simple_gla"), device=device)


def test_hopper_with_triton_3_6_refuses_the_gated_backward_before_any_work(fake_fla):
    fake_fla(True, True, False)
    assert fla_backends.gated_refusal("cuda:0") == fla_backends.GATED_REFUSAL
    with pytest.raises(Unsupported, match="produces incorrect results for gated"):
        fla_backends._refuse_gated_backward(_ctx("fwd_bwd"))
    fla_backends._refuse_gated_backward(_ctx("fwd"))  # the forward has no gated backward: it runs


@pytest.mark.parametrize("flags", [(True, True, True), (False, True, False), (True, False, False)])
def test_other_gpus_or_tritons_are_not_refused(fake_fla, flags):
    fake_fla(*flags)
    assert fla_backends.gated_refusal("cuda:0") is None
    fla_backends._refuse_gated_backward(_ctx("fwd_bwd"))


def test_tilelang_or_a_cpu_device_or_an_fla_without_the_flags_is_not_refused(fake_fla, monkeypatch):
    fake_fla(True, True, False)
    assert fla_backends.gated_refusal("cpu") is None
    monkeypatch.delattr(sys.modules["fla.ops.common.chunk_o"], "TRITON_ABOVE_3_7_1")
    assert fla_backends.gated_refusal("cuda:0") is None  # unknown fla: its runtime error stays the decline
    fake_fla(True, True, False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # tilelang present
    assert fla_backends.gated_refusal("cuda:0") is None
