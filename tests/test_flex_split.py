"""flex_split: the Sparse Transformer masks as two dense-tile parts merged by log-sum-exp. The decomposition
and the merge (gradients included) run through the harness on the CPU with a dense primitive in place of
FlexAttention; one case runs the real compiled FlexAttention forward on the CPU."""
from __future__ import annotations

import math

import pytest
import torch

from attnbench import masks
from attnbench.execute.case import CaseRunner
from attnbench.config.plan import Case
from attnbench.methods.exact import flex_split

TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 2, "flush_l2": False}
ENTRIES = ["sparse_strided(stride=8)", "sparse_strided(stride=16)", "sparse_fixed(stride=8,summary=2)",
           "sparse_fixed(stride=16,summary=16)"]


def dense_attend(q, k, v, block_mask, enable_gqa):
    """The primitive's contract, plainly: masked softmax over ``block_mask.mask_mod``, with its log-sum-exp."""
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    zero = torch.zeros((), dtype=torch.int64)
    visible = block_mask.mask_mod(zero, zero, torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :])
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num() @ v, torch.logsumexp(scores, dim=-1)


@pytest.fixture
def dense(monkeypatch):
    monkeypatch.setattr(flex_split, "ATTEND", dense_attend)


def run_case(entry, mode, seq=64, heads_kv=2, method="flex_split"):
    spec = masks.make_mask(entry)
    runner = CaseRunner("cpu", {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32})
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=2, heads_q=4, heads_kv=heads_kv,
                seq_q=seq, seq_kv=seq, head_dim=8, dtype="float32", mode=mode)
    return runner.run(case)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd", "bwd"])
def test_the_split_is_exact_with_gradients(dense, entry, mode):
    row = run_case(entry, mode)
    assert row["status"] == "ok", row["reason"]
    assert row["rel_err"] < 1e-5


def test_the_gate_catches_a_split_that_drops_a_part(monkeypatch):
    """The test above can fail: without the strided part the output is `wrong`."""

    def local_only(parts):
        return parts[0][0]

    monkeypatch.setattr(flex_split, "ATTEND", dense_attend)
    monkeypatch.setattr(flex_split, "merge", local_only)
    assert run_case("sparse_strided(stride=8)", "fwd")["status"] == "wrong"


def test_merge_of_disjoint_parts_equals_one_softmax():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 5, 12)
    values = torch.randn(2, 3, 12, 4)
    split = torch.zeros(12, dtype=torch.bool)
    split[[1, 4, 5, 9]] = True
    parts = []
    for keys in (split, ~split):
        masked = scores.masked_fill(~keys, float("-inf"))
        parts.append((torch.softmax(masked, -1) @ values, torch.logsumexp(masked, -1)))
    torch.testing.assert_close(flex_split.merge(parts), torch.softmax(scores, -1) @ values)


def test_rows_one_part_does_not_reach_weigh_nothing():
    out = torch.ones(1, 1, 2, 3)
    empty = (torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), float("-inf")))
    merged = flex_split.merge([(out, torch.zeros(1, 1, 2)), empty])
    assert torch.equal(merged, out)


@pytest.mark.parametrize("entry, seq, why", [
    ("sparse_strided(stride=24)", 64, "multiple of stride"),
])
def test_lengths_the_split_cannot_take_are_unsupported(dense, entry, seq, why):
    row = run_case(entry, "fwd", seq=seq)
    assert row["status"] == "unsupported" and why in row["reason"]


def test_the_planner_gives_it_only_the_sparse_transformer_masks():
    from attnbench.methods import METHODS

    caps = METHODS["flex_split"].caps
    assert caps.masks == {"sparse_strided", "sparse_fixed"} and not caps.cross and caps.compiled


def test_on_the_cpu_the_real_kernel_is_unsupported_with_the_reason():
    row = run_case("sparse_strided(stride=16)", "fwd")
    assert row["status"] == "unsupported" and "log-sum-exp" in row["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("entry", ["sparse_strided(stride=64)", "sparse_fixed(stride=64,summary=8)"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_compiled_flex_split_is_exact_on_the_gpu(entry, mode):
    spec = masks.make_mask(entry)
    runner = CaseRunner("cuda:0", {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32})
    case = Case(method="flex_split", mask=spec.label, mask_name=spec.name, batch=2, heads_q=8, heads_kv=2,
                seq_q=2048, seq_kv=2048, head_dim=64, dtype="bfloat16", mode=mode, device="cuda:0")
    row = runner.run(case)
    assert row["status"] == "ok", row["reason"]


def test_the_parts_take_non_contiguous_inputs(dense):
    """Strided views (a [B, S, H, D] tensor seen as [B, H, S, D]) work, with the same result."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 32, 4, 8).transpose(1, 2) for _ in range(3))
    for run in (flex_split.strided_parts(32, 8, "cpu"), flex_split.fixed_parts(32, 8, 2, "cpu")):
        torch.testing.assert_close(run(q, k, v, False), run(q.contiguous(), k.contiguous(), v.contiguous(), False))
