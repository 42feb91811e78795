"""The linear family on a CUDA GPU (pytest -m gpu; skipped without one): every own method and every fla-core
backend through the case runner in bf16 at 2K tokens, fwd and fwd_bwd; fla's refused gated backward on Hopper
with Triton < 3.7.1 must come back as `unsupported` with fla's reason, never as an error."""
from __future__ import annotations

import pytest
import torch

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute.case import CaseRunner
from attnbench.methods import METHODS

TIMING = {"budget_ms": 5, "warmup_ms": 1, "min_reps": 2, "max_reps": 3, "flush_l2": False, "cuda_graph": False,
          "telemetry": False}
OWN = ["linear_attn", "performer", "rfa", "cosformer", "softmax_rnn", "gated_delta_rule", "delta_rule",
       "simple_gla"]
FLA = ["fla_linear_attn", "fla_simple_gla", "fla_delta_rule", "fla_gated_delta_rule"]


def _run(method, mode, seq=2048):
    spec = masks.make_mask("causal")
    runner = CaseRunner("cuda:0", {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 33})
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=4, heads_kv=4, seq_q=seq,
                seq_kv=seq, head_dim=128, dtype="bfloat16", mode=mode, device="cuda:0")
    return runner.run(case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", OWN)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_own_methods_pass_the_gate_in_bf16(method, mode):
    row = _run(method, mode)
    assert row["status"] == "ok", row["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", FLA)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_fla_backends_run_or_decline_with_fla_reason(method, mode):
    available, why = METHODS[method].availability()
    if not available:
        pytest.skip(why)
    row = _run(method, mode)
    if row["status"] == "unsupported":
        assert "produces incorrect results" in row["reason"], row["reason"]
        assert mode == "fwd_bwd" and method in ("fla_simple_gla", "fla_gated_delta_rule")
    else:
        assert row["status"] == "ok", row["reason"]
