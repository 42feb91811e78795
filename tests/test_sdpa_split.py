"""cudnn_split: prefix-LM as full attention over the prefix rows plus causal attention for the rest. Run
through the harness on the CPU with SDPA's math backend in place of cuDNN."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from attnbench import masks
from attnbench.execute.case import CaseRunner
from attnbench.config.plan import Case
from attnbench.methods.exact import sdpa_split

TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 2, "flush_l2": False}


@pytest.fixture
def math_backend(monkeypatch):
    monkeypatch.setattr(sdpa_split, "BACKENDS", [SDPBackend.MATH])


def run_case(entry, mode, seq=48, heads_kv=2, device="cpu", dtype="float32"):
    spec = masks.make_mask(entry)
    runner = CaseRunner(device, {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32})
    case = Case(method="cudnn_split", mask=spec.label, mask_name=spec.name, batch=2, heads_q=4, heads_kv=heads_kv,
                seq_q=seq, seq_kv=seq, head_dim=8, dtype=dtype, mode=mode, device=device)
    return runner.run(case)


@pytest.mark.parametrize("prefix", [1, 17, 47, 48])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_the_row_split_is_exact(math_backend, prefix, mode):
    row = run_case(f"prefix_lm(prefix={prefix})", mode)
    assert row["status"] == "ok", row["reason"]
    assert row["rel_err"] < 1e-5


def test_mha_too(math_backend):
    assert run_case("prefix_lm(prefix=9)", "fwd_bwd", heads_kv=4)["status"] == "ok"


def test_without_the_prefix_rows_it_would_be_wrong(math_backend, monkeypatch):
    """The gate sees the difference: plain causal attention (no prefix rows) is `wrong` for a prefix-LM mask."""
    monkeypatch.setattr(sdpa_split, "prefix_rows", lambda mask, seq: 0)
    assert run_case("prefix_lm(prefix=17)", "fwd")["status"] == "wrong"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_cudnn_split_is_exact_on_the_gpu(mode):
    row = run_case("prefix_lm(prefix=300)", mode, seq=2048, device="cuda:0", dtype="bfloat16")
    assert row["status"] == "ok", row["reason"]
