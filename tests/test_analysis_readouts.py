"""HISTOGRAPH readout (methods-spec-3 §6) and its place among the ``history -> vector`` readouts: the batched module
against the readable fp64 reference (with negative controls), the exactness anchors (uniform depth = the mean over
layers, one-hot last = a last-layer readout), node-permutation invariance (a causal node stage is caught), the
signed-normalisation guard, gradients, and the task option that selects it."""
from __future__ import annotations

import pytest
import torch

from attnbench.methods.analysis import histograph, latent
from attnbench.methods.analysis.histograph import HistographReadout, histograph_reference


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _history(batch=3, nodes=7, d=16, layers=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, nodes, d, generator=gen) for _ in range(layers)]


def _valid(batch=3, nodes=7):
    valid = torch.ones(batch, nodes, dtype=torch.bool)
    valid[0, 5:] = False
    valid[2, :2] = False  # left padding
    return valid


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _plain(readout):
    """Identity per-layer maps, zero biases, no layer codes: x~ = x."""
    with torch.no_grad():
        readout.hist_weight.copy_(torch.eye(readout.d).expand_as(readout.hist_weight))
        readout.hist_bias.zero_()
        readout.codes.zero_()
    return readout


def test_module_matches_the_reference_with_padding():
    torch.manual_seed(0)
    readout = HistographReadout(16, 3, heads=2)
    history, valid = _history(), _valid()
    g = readout(history, valid)
    want, alpha = histograph_reference(readout, history, valid)
    assert _rel(g, want) < 1e-5
    assert torch.allclose(alpha.sum(-1), torch.ones(3, dtype=torch.float64))  # the weights sum to 1
    xt = readout.embed_history(history)
    assert _rel(readout.depth_weights(xt, valid), alpha) < 1e-5


def test_reference_catches_softmax_depth_weights_and_a_node_mean_over_padding(monkeypatch):
    torch.manual_seed(0)
    readout = HistographReadout(16, 3, heads=2)
    history, valid = _history(), _valid()
    want, _ = histograph_reference(readout, history, valid)
    with monkeypatch.context() as m:  # negative control 1: softmax in place of the signed normalisation
        m.setattr(histograph, "signed_normalize", lambda c, eps: (c.softmax(-1), torch.zeros(len(c), dtype=torch.bool)))
        assert _rel(readout(history, valid), want) > 1e-3
    assert _rel(readout(history), want) > 1e-3  # negative control 2: padding not masked


def test_uniform_depth_is_the_mean_over_layers():
    torch.manual_seed(0)
    history, valid = _history(), _valid()
    readout = _plain(HistographReadout(16, 3, heads=2, depth="uniform", nodes="none"))
    pool_mean = latent.make_readout("pool_mean", 16, 3)
    want = torch.stack([pool_mean([h], valid) for h in history]).mean(0)
    assert _rel(readout(history, valid), want) < 1e-6
    # through the learned depth attention: equal logits on every layer give alpha = 1/L exactly
    learned = _plain(HistographReadout(16, 3, heads=2))
    same = [history[0]] * 3
    xt = learned.embed_history(same)
    assert torch.allclose(learned.depth_weights(xt, valid), torch.full((3, 3), 1 / 3), atol=1e-6)
    uniform = HistographReadout(16, 3, heads=2, depth="uniform")
    uniform.load_state_dict(learned.state_dict())
    assert _rel(learned(same, valid), uniform(same, valid)) < 1e-5


def test_last_depth_is_a_last_layer_readout():
    history, valid = _history(), _valid()
    readout = _plain(HistographReadout(16, 3, heads=2, depth="last", nodes="none"))
    assert _rel(readout(history, valid), latent.make_readout("pool_mean", 16, 3)(history, valid)) < 1e-6


def test_node_permutation_invariance_and_a_causal_node_stage_is_caught(monkeypatch):
    torch.manual_seed(0)
    readout = HistographReadout(16, 3, heads=2)
    history, valid = _history(), _valid()
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    shuffled = [h[:, perm] for h in history]
    assert _rel(readout(shuffled, valid[:, perm]), readout(history, valid)) < 1e-5
    # the layer axis is not a set: the last layer is the query and the layer codes differ
    assert _rel(readout(history[::-1], valid), readout(history, valid)) > 1e-3
    real = torch.nn.functional.scaled_dot_product_attention

    def causal(q, k, v, attn_mask=None):  # negative control: node order leaks in through a causal node stage
        return real(q, k, v, attn_mask=attn_mask & torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril())

    monkeypatch.setattr(histograph.F, "scaled_dot_product_attention", causal)
    assert _rel(readout(shuffled, valid[:, perm]), readout(history, valid)) > 1e-3


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    readout = HistographReadout(16, 3, heads=2)
    history = [h.requires_grad_() for h in _history()]
    readout(history, _valid()).square().sum().backward()
    for name, p in readout.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(h.grad.abs().sum() > 0 for h in history)


def test_signed_normalisation_guard_keeps_the_sign_and_counts():
    alpha, guard = histograph.signed_normalize(torch.tensor([[1.0, -1.0, 0.5, -0.5], [1.0, 2.0, -1.0, 2.0]]), 1e-6)
    assert guard.tolist() == [True, False] and torch.isfinite(alpha).all()
    assert torch.allclose(alpha[1], torch.tensor([0.25, 0.5, -0.25, 0.5]))  # negative weights survive (FIR filter)
    alpha, guard = histograph.signed_normalize(torch.tensor([[1e-8, -3e-8]]), 1e-6)
    assert guard.item() and torch.allclose(alpha, torch.tensor([[-1e-2, 3e-2]]))  # divided by -eps
    readout = HistographReadout(16, 3, heads=2)
    with torch.no_grad():
        readout.wq.weight.zero_()  # every depth logit 0
    out = readout(_history(), _valid())
    assert torch.isfinite(out).all() and readout.guard_fired == 3


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="depth"):
        HistographReadout(16, 3, depth="softmax")
    with pytest.raises(ValueError, match="layers"):
        HistographReadout(16, 3)(_history(layers=2))
    with pytest.raises(ValueError, match="key_padding_mask"):
        HistographReadout(16, 3)(_history(), torch.zeros(3, 7, dtype=torch.bool))


def test_listops_selects_the_readout_with_its_padding_masked(tmp_path):
    import pandas as pd

    from attnbench.execute.train import run_train
    from attnbench.tasks import TASKS, TaskParamError, task_params
    from attnbench.tasks.encoder import PAD
    from attnbench.tasks.model import build_model
    from attnbench.tasks.train import attention_case

    params = task_params("listops", {"d_model": 16, "heads": 2, "layers": 2, "readout": "histograph_readout"})
    task = TASKS["listops"].make(params, 16)
    model = build_model(task, attention_case(task, "sdpa_math", 2, "float32", 0, "cpu"), "cpu", {}, {})
    assert isinstance(model.pool, HistographReadout)
    seen = {}
    forward = model.pool.forward
    model.pool.forward = lambda history, mask=None: seen.setdefault("mask", mask) is None or forward(history, mask)
    batch = task.sample(3, torch.Generator().manual_seed(0), "train")
    assert model(batch).shape == (3, task.classes)
    assert torch.equal(seen["mask"], batch.inputs != PAD) and not seen["mask"].all()
    with pytest.raises(TaskParamError, match="task_options.listops.readout"):
        TASKS["listops"].make(task_params("listops", {"readout": "histograph"}), 16)
    cfg = {"tasks": ["listops"], "methods": ["sdpa_math"], "seeds": [0], "dtype": "float32", "device": "cpu",
           "results_dir": str(tmp_path), "run_id": "hg", "steps": 2,
           "task_options": {"listops": {"seq_lens": [16], "d_model": 16, "heads": 2, "layers": 2, "batch": 4,
                                        "eval_batches": 1, "readout": "histograph_readout"}}}
    row = pd.read_parquet(run_train(cfg, "test", show_progress=False) / "quality.parquet").iloc[0]
    assert row["status"] == "ok", row["reason"]
    assert "histograph_readout" in row["model_options"] and "histograph_guard_fired" in row["extras"]
