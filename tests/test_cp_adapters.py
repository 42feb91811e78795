"""The yunchang / ring-flash-attn CP adapters: available only where the package imports (a stub module in
sys.modules stands in for yunchang, which is not installed here), ``unsupported`` rows with the reason
elsewhere; the adapter's plumbing (layout [B, S, H, D], causal flag, scale) runs through a stub
UlyssesAttention on a one-rank gloo group, and a stub that ignores the causal flag is caught as wrong."""
from __future__ import annotations

import copy
import enum
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import attnbench.config.plan
from attnbench.config.plan import Case, build_plan
from attnbench.cp import adapters
from attnbench.execute.runner import worker_options

from conftest import BASE
from test_cp import TIMING


def stub_yunchang(causal_respected: bool = True) -> dict:
    """sys.modules entries of a stand-in yunchang: UlyssesAttention = SDPA on [B, S, H, D] (world 1)."""

    class AttnType(enum.Enum):
        FA = "fa"
        TORCH_MATH = "torch_math"
        TORCH_FLASH = "torch_flash"

        @classmethod
        def from_string(cls, s):
            return cls(s)

    class UlyssesAttention(torch.nn.Module):
        def __init__(self, group=None, attn_type=AttnType.FA):
            super().__init__()
            self.attn_type = attn_type

        def forward(self, q, k, v, softmax_scale=None, causal=False):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=causal and causal_respected, scale=softmax_scale)
            return out.transpose(1, 2)

    root = types.ModuleType("yunchang")
    root.UlyssesAttention = UlyssesAttention
    root.LongContextAttention = UlyssesAttention
    root.set_seq_parallel_pg = lambda *args: None
    kernels = types.ModuleType("yunchang.kernels")
    kernels.AttnType = AttnType
    glob = types.ModuleType("yunchang.globals")
    glob.PROCESS_GROUP = types.SimpleNamespace(ULYSSES_PG=None, RING_PG=None)
    return {"yunchang": root, "yunchang.kernels": kernels, "yunchang.globals": glob}


def install(monkeypatch, modules: dict) -> None:
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_availability_follows_importability(monkeypatch):
    if "yunchang" not in sys.modules:  # the real package (GPU machines) is left alone
        ok, reason = adapters.availability("yunchang_ulysses")
        assert not ok and "yunchang not importable" in reason
    monkeypatch.setitem(sys.modules, "yunchang", None)  # found in sys.modules, fails to import
    ok, reason = adapters.availability("yunchang_usp")
    assert not ok and "yunchang not importable" in reason
    install(monkeypatch, stub_yunchang())  # negative control: importable -> available
    assert adapters.availability("yunchang_ulysses") == (True, "yunchang's UlyssesAttention")
    monkeypatch.setitem(sys.modules, "ring_flash_attn", None)
    assert "ring_flash_attn not importable" in adapters.availability("ring_flash_attn")[1]


@pytest.fixture
def adapter_cfg(tmp_path):
    config = copy.deepcopy(BASE)
    config.update(results_dir=str(tmp_path / "results"), run_id="adapters", seq_lens=[16], heads_q=2, heads_kv=2,
                  head_dim=8, masks=["causal", "sliding_window(left=3)"], modes=["fwd_bwd"],
                  methods=["sdpa_flash", "linear_attn"], layouts=["yunchang_ulysses", "ring_flash_attn"], cp=[2],
                  dtype="bfloat16")  # sdpa_flash takes no float32 on CUDA
    return config


def reasons_of(cfg):
    plan = build_plan(cfg)
    return {(c.method, c.layout, c.mask): r for c, r in plan.unsupported}, plan.runnable


def test_planner_rows_with_and_without_the_package(adapter_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "yunchang", None)
    monkeypatch.setitem(sys.modules, "ring_flash_attn", None)
    reasons, runnable = reasons_of(adapter_cfg)
    assert not runnable and len(reasons) == 8
    assert all("not importable" in r for r in reasons.values())
    # yunchang importable, two GPUs: sdpa_flash on the causal mask runs; the rest say why not
    install(monkeypatch, stub_yunchang())
    monkeypatch.setattr(attnbench.config.plan, "resolve_devices", lambda cfg: ["cuda:0", "cuda:1"])
    reasons, runnable = reasons_of(adapter_cfg)
    assert {(c.method, c.layout, c.mask) for c in runnable} == {("sdpa_flash", "yunchang_ulysses", "causal")}
    assert "full or causal masks only" in reasons[("sdpa_flash", "yunchang_ulysses", "sliding_window(left=3)")]
    assert "local kernels" in reasons[("linear_attn", "yunchang_ulysses", "causal")]
    assert "ring_flash_attn not importable" in reasons[("sdpa_flash", "ring_flash_attn", "causal")]
    # on the CPU: yunchang's torch ring ends in SDPA's CUDA flash op
    monkeypatch.setattr(attnbench.config.plan, "resolve_devices", lambda cfg: ["cpu"])
    reasons, runnable = reasons_of(adapter_cfg)
    assert not runnable and "CUDA only" in reasons[("sdpa_flash", "yunchang_ulysses", "causal")]


@pytest.mark.parametrize("respected", [True, False])
def test_adapter_plumbing_through_a_stub_on_one_rank(monkeypatch, respected):
    from attnbench.cp.gang import free_port
    from attnbench.cp.rankcase import RankRunner, process_group

    install(monkeypatch, stub_yunchang(causal_respected=respected))
    case = Case(method="sdpa_math", mask="causal", mask_name="causal", batch=1, heads_q=2, heads_kv=1, seq_q=12,
                seq_kv=12, head_dim=8, dtype="float32", mode="fwd_bwd", layout="yunchang_ulysses", world_size=1,
                seed=0)
    with process_group("gloo", 0, 1, free_port()):
        row = RankRunner(0, 1, "cpu", worker_options({"timing": TIMING})).run(case)
    if respected:
        assert row["status"] == "ok" and row["rel_err"] < 1e-5, row.get("reason")
    else:  # negative control: a library call that drops the causal flag is caught
        assert row["status"] == "wrong", row.get("reason")
