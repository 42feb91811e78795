"""Methods with extra inputs or a prepare step in the experiment tasks (issue 14: "swap in every method"):
icl_linreg_1layer_mh makes per-token extras learned maps of the tokens z (the task models' ``ExtraProjection``),
trains them with the model and reuses them at 4 L; fixed-size extras are drawn; an extra whose shape is neither
per token nor fixed stays unsupported, naming it. rf_attention_probe and sparse_gin_minilm train nothing around
the method: a prepare step runs, a per-token extra is refused with a reason that says it would need training.
The planner's reason for a layer-form method uses the right article."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from attnbench.execute.train import build_train_plan, run_train
from attnbench.methods import METHODS, Capabilities, Extra, Prepared, Unsupported, register_method
from attnbench.tasks import TASKS, task_params

TINY = {"seq_lens": [8], "d": 3, "heads": 2, "head_dim": 4, "steps": 3, "batch": 8, "eval_batches": 1,
        "test_factors": [1, 4]}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture
def spy_methods():
    """Two test methods over causal softmax attention: ``t_gate_spy`` with a per-token log-gate ``g`` that scales
    each output row (so the gate gets a gradient), recording the g it receives; ``t_shape_extra`` with one extra
    ``p`` whose shape is set per test (``shapes["p"]``: a function of the case)."""
    seen, shapes = [], {}

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def build_gate(ctx):
        c = ctx.case

        def fn(q, k, v, g):
            seen.append(g.detach().clone())
            return attend(q, k, v) * g.exp()[..., None].to(q.dtype)

        return Prepared(fn=fn, extras={"g": Extra(shape=(c.batch, c.heads_q, c.seq_kv), init="logsigmoid",
                                                  dtype="float32")})

    def build_shape(ctx):
        return Prepared(fn=lambda q, k, v, p: attend(q, k, v) + 0 * p.sum(),
                        extras={"p": Extra(shape=shapes["p"](ctx.case))})

    caps = Capabilities(family="linear", exact=False, masks={"causal"}, backward=True)
    register_method("t_gate_spy", caps)(build_gate)
    register_method("t_shape_extra", caps)(build_shape)
    try:
        yield seen, shapes
    finally:
        METHODS.pop("t_gate_spy")
        METHODS.pop("t_shape_extra")


def _icl(**changes):
    return TASKS["icl_linreg_1layer_mh"].make(task_params("icl_linreg_1layer_mh", {**TINY, **changes}), 8)


def test_icl_runs_methods_with_gate_extras_and_a_prepare_step(tmp_path):
    """H200: performer (prepare: its random features), gated_delta_rule (extras g, β) were `unsupported` ("needs
    extra inputs or a prepare step (not wired here)"); now rows are ok at L and 4 L."""
    cfg = {"tasks": ["icl_linreg_1layer_mh"], "methods": ["gated_delta_rule", "performer"], "seeds": [0],
           "dtype": "float32", "device": "cpu", "results_dir": str(tmp_path), "run_id": "iclx",
           "task_options": {"icl_linreg_1layer_mh": TINY}}
    frame = pd.read_parquet(run_train(cfg, "test", show_progress=False) / "quality.parquet").set_index("method")
    assert len(frame) == 2
    for method, row in frame.iterrows():
        assert row.status == "ok", (method, row.reason)
        mse = json.loads(row.breakdown)
        assert set(mse) == {"mse@1x", "mse@4x"} and all(math.isfinite(v) for v in mse.values()), method
    # the gate maps are the model's parameters: z (d + 1 = 4 wide) -> 2 heads, for g and for β, weights and biases
    assert frame.loc["gated_delta_rule", "parameters"] - frame.loc["performer", "parameters"] == 2 * (4 * 2 + 2)


def test_icl_trains_the_gate_projection_and_reuses_it_at_four_times_the_length(spy_methods):
    seen, _ = spy_methods
    task = _icl()
    model = task._model("t_gate_spy", 2, 0, "float32", "cpu", {}, {})
    assert list(model.extra_maps) == ["g"]
    projection = model.extra_maps["g"].proj
    assert {id(p) for p in projection.parameters()} <= {id(p) for p in model.parameters()}  # trained with W_KQ
    before = projection.weight.detach().clone(), projection.bias.detach().clone()
    gen = torch.Generator().manual_seed(0)
    losses, problem = task._train(model, 3, 8, gen, "cpu", torch.float32, None)
    assert problem is None and len(losses) == 3
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert not torch.equal(projection.weight, before[0]) and not torch.equal(projection.bias, before[1])
    # at 4 L the method is built again (33 tokens): the g it receives is the trained map of those tokens
    from attnbench.tasks.analysis import icl_batch

    z, _, _, _ = icl_batch(8, 32, 3, 0.1, torch.Generator().manual_seed(1))
    seen.clear()
    with torch.no_grad():
        model(z)
        trained = F.logsigmoid(projection(z)).transpose(1, 2)  # [B, H, 33]
        untrained = F.logsigmoid(F.linear(z, *before)).transpose(1, 2)
    assert len(seen) == 1 and seen[0].shape == (8, 2, 33)
    assert torch.allclose(seen[0], trained) and not torch.allclose(seen[0], untrained)
    assert model.extra_maps["g"].proj is projection  # one map, trained at L, used at every length


def test_icl_single_head_model_gets_its_own_maps(spy_methods):
    task = _icl()
    single = task._model("t_gate_spy", 1, 0, "float32", "cpu", {}, {})
    assert single.extra_maps["g"].proj.out_features == 1  # one gate per token for its one head


@pytest.mark.parametrize("shape, ok", [
    (lambda c: (c.heads_q, 3), True),  # fixed size: drawn per call
    (lambda c: (c.batch, c.heads_q, c.seq_kv, c.seq_kv), False),  # pairwise: neither per token nor fixed
    (lambda c: (c.batch, c.heads_q, 2 * c.seq_kv), False),  # a token axis of the wrong length
])
def test_icl_refuses_an_extra_that_is_neither_per_token_nor_fixed(spy_methods, shape, ok):
    _, shapes = spy_methods
    shapes["p"] = shape
    task = _icl(baselines=False)
    if ok:
        outcome = task.probe("t_shape_extra", seed=0)
        assert outcome.status == "ok" and set(outcome.breakdown) == {"mse@1x", "mse@4x"}
    else:
        with pytest.raises(Unsupported, match=r"t_shape_extra's extra 'p' has shape .* neither one entry per token"):
            task.probe("t_shape_extra", seed=0)


def _rf():
    params = task_params("rf_attention_probe", {"features": 8, "samples": [16], "test": 16, "batch": 16,
                                                "targets": ["quadratic"]})
    return TASKS["rf_attention_probe"].make(params, 4)


def test_rf_probe_runs_a_prepare_step_and_refuses_a_learned_extra_saying_why():
    outcome = _rf().probe("performer", seed=0)  # prepare only: its random features, drawn per call (seeded)
    assert outcome.status == "ok" and outcome.extras["checks"]["key_permutation_invariant"]
    with pytest.raises(Unsupported, match=r"rf_attention_probe fits the values in closed form with nothing trained"
                                          r".*abc's extra 's' \(one per key\) would be a learned projection"):
        _rf().probe("abc", seed=0)


def test_sparse_gin_refuses_a_learned_extra_and_runs_a_prepare_step(spy_methods):
    """The adapter task keeps the encoder frozen: no map to learn there. A prepare step runs (the encoder's own
    package is not needed to build the attention the encoder calls)."""
    task = TASKS["sparse_gin_minilm"].make(task_params("sparse_gin_minilm", {"seq_lens": [12]}), 12)
    register_method("t_exact_gate", Capabilities(masks={"full"}))(METHODS["t_gate_spy"].build)
    seen = []

    def build_prep(ctx):
        def prepare(q, k, v):
            seen.append("prepare")
            return {"scale": torch.full((), 2.0)}
        return Prepared(fn=lambda q, k, v, scale: F.scaled_dot_product_attention(q, k, v) * scale, prepare=prepare)

    register_method("t_exact_prep", Capabilities(masks={"full"}))(build_prep)
    try:
        with pytest.raises(Unsupported, match="keeps the pretrained encoder frozen and trains only the adapter; "
                                              "t_exact_gate's extra 'g'"):
            task._encoder("t_exact_gate", 0, "float32", "cpu", {}, {})(2, 6)
        attend = task._encoder("t_exact_prep", 0, "float32", "cpu", {}, {})(2, 6)
        q, k, v = (torch.randn(2, 12, 6, 32) for _ in range(3))
        assert torch.allclose(attend(q, k, v), 2 * F.scaled_dot_product_attention(q, k, v)) and seen == ["prepare"]
    finally:
        METHODS.pop("t_exact_gate")
        METHODS.pop("t_exact_prep")


def test_a_layer_form_method_is_refused_with_the_right_article(tmp_path):
    cfg = {"tasks": ["icl_linreg_1layer_mh"], "methods": ["decon_mlp"], "seeds": [0], "dtype": "float32",
           "device": "cpu", "results_dir": str(tmp_path), "task_options": {"icl_linreg_1layer_mh": TINY}}
    (_, reason), = build_train_plan(cfg).unsupported
    assert reason.startswith("an experiment calls the method on q, k, v")
