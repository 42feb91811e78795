"""Host-model options of issue 14 (hybrid_schedule, the fixed-map qk_source variants, pooled readouts, qk_dim) and
the experiment tasks (icl_linreg_1layer_mh, mqar_state_sweep, rf_attention_probe): the schedules place the layers,
the fixed maps are fixed, the mechanism checks pass on the paper's solution and fail on a perturbed one, the
ridge fit is the least-squares solution, key-permutation invariance, and small end-to-end runs."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from attnbench.execute.train import run_train
from attnbench.tasks import TASKS, TaskParamError, task_params
from attnbench.tasks import analysis
from attnbench.tasks.model import MethodAttention, StandardAttention, build_model, hybrid_layers
from attnbench.tasks.train import attention_case

# Deconstructing Attention, App. P Tbl. 11: the layers that keep standard attention in a 24-layer model
TABLE_11 = {
    "even": list(range(2, 25, 2)), "odd": list(range(1, 24, 2)), "top": list(range(1, 13)),
    "middle": list(range(1, 7)) + list(range(19, 25)), "bottom": list(range(13, 25)),
    "25%": [4, 8, 12, 16, 20, 24], "first": [1], "last": [24], "bilateral": [1, 24],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.mark.parametrize("name", list(TABLE_11))
def test_hybrid_schedules_are_the_papers_layer_ids(name):
    assert hybrid_layers(name, 24) == TABLE_11[name]


def _model(task_name, method="sdpa_math", seq=16, **options):
    params = task_params(task_name, {"d_model": 16, "heads": 2, "layers": 4, **options})
    task = TASKS[task_name].make(params, seq)
    case = attention_case(task, method, 2, "float32", 0, "cpu")
    return task, build_model(task, case, "cpu", {}, {})


def test_hybrid_schedule_places_standard_attention_in_the_named_layers():
    _, model = _model("mqar", "linear_attn", vocab=64, kv_pairs=2, hybrid_schedule="odd")
    kinds = [type(b.mixer).__name__ for b in model.blocks]
    assert kinds == ["StandardAttention", "MethodAttention", "StandardAttention", "MethodAttention"]
    _, model = _model("mqar", "linear_attn", vocab=64, kv_pairs=2, hybrid_schedule=[4])
    assert [isinstance(b.mixer, StandardAttention) for b in model.blocks] == [False, False, False, True]
    with pytest.raises(TaskParamError, match="task_options.mqar.hybrid_schedule"):
        _model("mqar", vocab=64, kv_pairs=2, hybrid_schedule=[5])
    with pytest.raises(TaskParamError, match="task_options.mqar.hybrid_schedule"):
        _model("mqar", vocab=64, kv_pairs=2, hybrid_schedule="sideways")


def _recorded_qk(model, batch, layer):
    """The q and k the method's kernel receives at ``layer``."""
    mixer = model.blocks[layer].mixer
    seen = {}
    real = mixer.prepared.fn

    def record(q, k, v, **kw):
        seen["q"], seen["k"] = q.detach().clone(), k.detach().clone()
        return real(q, k, v, **kw)

    mixer.prepared.fn = record
    with torch.no_grad():
        model(batch)
    mixer.prepared.fn = real
    return seen["q"], seen["k"]


@pytest.mark.parametrize("source", ["random_ref", "fixed_seq"])
def test_reference_maps_are_the_same_for_every_input_and_move_with_the_reference(source):
    task, model = _model("mqar", vocab=64, kv_pairs=2, qk_source=source)
    batch = task.sample(2, torch.Generator().manual_seed(0), "train")
    q, k = _recorded_qk(model, batch, 1)
    assert torch.equal(q[0], q[1]) and torch.equal(k[0], k[1])  # one map for both examples
    _, current = _model("mqar", vocab=64, kv_pairs=2)
    current.load_state_dict(model.state_dict(), strict=False)
    cq, _ = _recorded_qk(current, batch, 1)
    assert not torch.equal(cq[0], cq[1])  # the plain model's q differs between the examples
    if source == "random_ref":
        model.reference.normal_()  # another reference (another seed): another map
    else:
        model.reference_ids.random_(0, 64)
    q2, _ = _recorded_qk(model, batch, 1)
    assert not torch.allclose(q, q2)


def test_static_embedding_map_does_not_depend_on_lower_layers():
    task, model = _model("mqar", vocab=64, kv_pairs=2, qk_source="static_emb")
    batch = task.sample(2, torch.Generator().manual_seed(0), "train")
    q, k = _recorded_qk(model, batch, 2)
    with torch.no_grad():
        for block in model.blocks[:2]:
            for p in block.parameters():
                p.add_(torch.randn_like(p))
    q2, k2 = _recorded_qk(model, batch, 2)
    assert torch.equal(q, q2) and torch.equal(k, k2)
    _, plain = _model("mqar", vocab=64, kv_pairs=2)  # control: with current Q/K the perturbation moves them
    plain.load_state_dict(model.state_dict(), strict=False)
    p1, _ = _recorded_qk(plain, batch, 2)
    with torch.no_grad():
        for p in plain.blocks[0].parameters():
            p.add_(torch.randn_like(p))
    p2, _ = _recorded_qk(plain, batch, 2)
    assert not torch.allclose(p1, p2)


def test_fixed_maps_refuse_layer_methods_and_cross_tasks():
    from attnbench.methods import Unsupported

    with pytest.raises(Unsupported, match="qk_source"):
        _model("mqar", "decon_mlp", vocab=64, kv_pairs=2, qk_source="static_emb")
    with pytest.raises(TaskParamError, match="qk_source"):
        _model("sort", qk_source="random_ref")


def test_pooled_readout_and_qk_dim():
    task, model = _model("listops", readout="pool_latent_multilayer")
    batch = task.sample(3, torch.Generator().manual_seed(0), "train")
    assert model(batch).shape == (3, task.classes)
    with pytest.raises(TaskParamError, match="readout"):
        _model("mqar", vocab=64, kv_pairs=2, readout="pool_mean")
    _, model = _model("mqar", "linear_attn", vocab=64, kv_pairs=2, qk_dim=3)
    mixer = model.blocks[0].mixer
    assert isinstance(mixer, MethodAttention) and mixer.q.out_features == 2 * 3 and mixer.case.head_dim == 3


def test_train_rows_carry_the_model_options(tmp_path):
    cfg = {"tasks": ["mqar"], "methods": ["linear_attn"], "seeds": [0], "dtype": "float32", "device": "cpu",
           "results_dir": str(tmp_path), "run_id": "hy", "hybrid_schedule": "first", "steps": 3,
           "task_options": {"mqar": {"vocab": 64, "kv_pairs": 2, "seq_lens": [16], "d_model": 16, "batch": 4}}}
    run_dir = run_train(cfg, "test", show_progress=False)
    row = pd.read_parquet(run_dir / "quality.parquet").iloc[0]
    assert row.status == "ok" and json.loads(row.model_options) == {"hybrid_schedule": "first"}


# ---- icl_linreg_1layer_mh ----------------------------------------------------------------------------------------
def _paper_solution(d=4, heads=4, omega=(0.3, 0.3, -0.3, -0.3), mu=(1.0, 0.5, -1.0, -0.5)):
    model = analysis.ICLModel(heads, d, 8, 0.0, "method", fn_for=None)
    with torch.no_grad():
        model.w_kq.zero_()
        model.w_ov.zero_()
        for h in range(heads):
            model.w_kq[h, :d, :d] = omega[h] * torch.eye(d)
            model.w_ov[h, d, d] = mu[h]
    return model


def _icl_check(model):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    model.fn_for = lambda tokens: (lambda q, k, v: sdpa(q, k, v, is_causal=True))
    z, _, _, _ = analysis.icl_batch(64, 16, 4, 0.1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return analysis.mechanism(model, z, model(z))


def test_icl_mechanism_checks_pass_on_the_papers_solution_and_fail_when_perturbed():
    good = _icl_check(_paper_solution())
    assert all(good["checks"].values()), good
    assert good["numbers"]["closed_form_r2"] > 0.999999
    skewed = _paper_solution()
    with torch.no_grad():
        skewed.w_kq[:, 0, 1] = 0.2  # off-diagonal x-block
        skewed.w_ov[:, 4, 0] = 0.3  # OV not last-entry-only
    bad = _icl_check(skewed)
    assert not bad["checks"]["kq_offdiag_ratio<0.05"] and not bad["checks"]["ov_last_entry_ratio<0.05"]
    assert not bad["checks"]["closed_form_r2>0.99"]
    unbalanced = _icl_check(_paper_solution(mu=(1.0, 0.5, -0.2, -0.1)))
    assert not unbalanced["checks"]["zero_sum_ratio<0.05"]


def test_icl_experiment_runs_and_reports_its_checks():
    params = task_params("icl_linreg_1layer_mh", {"seq_lens": [8], "d": 3, "heads": 2, "head_dim": 4, "steps": 40,
                                                  "batch": 32, "lr": 0.01, "eval_batches": 2})
    task = TASKS["icl_linreg_1layer_mh"].make(params, 8)
    outcome = task.probe("sdpa_math", seed=0)
    assert outcome.status == "ok" and math.isfinite(outcome.value)
    assert set(outcome.breakdown) == {"mse@1x", "mse@4x"}
    assert {"multihead_beats_single", "degrades_less_than_linear", "zero_sum_ratio<0.05"} <= set(outcome.extras["checks"])
    with pytest.raises(TaskParamError, match="head_dim"):
        TASKS["icl_linreg_1layer_mh"].make({**params, "head_dim": 3}, 8)


def test_icl_builds_the_method_again_for_every_evaluation_length(tmp_path):
    """H200: eager / reference "size of tensor a (33) must match ... (129)": the method built for L + 1 tokens was
    called at 4 L + 1. Methods whose built state depends on the length (eager's and reference's bound mask,
    softmax_divs_gate's) run at 4 L too; sdpa_math (no such state) is the control that passed before."""
    cfg = {"tasks": ["icl_linreg_1layer_mh"], "methods": ["eager", "reference", "softmax_divs_gate", "sdpa_math"],
           "seeds": [0], "dtype": "float32", "device": "cpu", "results_dir": str(tmp_path), "run_id": "icl",
           "task_options": {"icl_linreg_1layer_mh": {"seq_lens": [8], "d": 3, "heads": 2, "head_dim": 4, "steps": 3,
                                                     "batch": 8, "eval_batches": 1, "test_factors": [1, 4]}}}
    frame = pd.read_parquet(run_train(cfg, "test", show_progress=False) / "quality.parquet").set_index("method")
    assert len(frame) == 4
    for method, row in frame.iterrows():
        assert row.status == "ok", (method, row.reason)
        mse = json.loads(row.breakdown)
        assert set(mse) == {"mse@1x", "mse@4x"} and all(math.isfinite(v) for v in mse.values()), method
    # one trained model per method, evaluated at two lengths: exact methods agree at both
    assert frame.loc["eager", "breakdown"] == frame.loc["reference", "breakdown"]


# ---- rf_attention_probe ------------------------------------------------------------------------------------------
def test_ridge_fit_is_the_regularised_least_squares_solution():
    gen = torch.Generator().manual_seed(0)
    for n, p in ((40, 10), (10, 40)):  # primal and dual forms
        phi = torch.randn(n, p, generator=gen, dtype=torch.float64)
        y = torch.randn(n, generator=gen, dtype=torch.float64)
        w = analysis.ridge_fit(phi, y, 0.1)
        grad = 2 * phi.T @ (phi @ w - y) / n + 2 * 0.1 * w  # the objective's gradient vanishes there
        assert grad.abs().max() < 1e-10


def test_rf_probe_is_key_permutation_invariant_and_runs():
    params = task_params("rf_attention_probe", {"features": 16, "samples": [32, 64], "test": 32, "batch": 32})
    task = TASKS["rf_attention_probe"].make(params, 4)
    outcome = task.probe("sdpa_math", seed=0)
    assert outcome.status == "ok" and outcome.extras["checks"]["key_permutation_invariant"]
    assert outcome.extras["permutation_rel_err"] < 1e-5
    assert {f"quadratic/{m}/n={n}" for m in ("rfa", "rfmlp") for n in (32, 64)} <= set(outcome.breakdown)
    x0 = analysis.sphere(5, 1, 8, torch.Generator().manual_seed(1))[:, 0]
    xs = analysis.sphere(5, 4, 8, torch.Generator().manual_seed(2))
    beta = torch.randn(8, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    for target, invariant in (("quadratic", True), ("cubic", True), ("control", False)):
        same = torch.allclose(analysis.rf_targets(x0, xs, beta, target), analysis.rf_targets(x0, xs[:, perm], beta, target))
        assert same == invariant


@pytest.mark.parametrize("method", ["sdpa_efficient", "linear_attn", "taylor_softmax"])
def test_rf_probe_keeps_every_tensor_on_the_device(method):
    """H200: "mat2 is on cpu, different from other tensors on cuda:0" (the frozen W_m made on the CPU). Here the
    probe runs on a stand-in device (tests/fakedevice.py) that raises where CUDA would."""
    from fakedevice import OnFakeDevice

    params = task_params("rf_attention_probe", {"features": 8, "samples": [16], "test": 16, "batch": 16,
                                                "targets": ["quadratic"]})
    task = TASKS["rf_attention_probe"].make(params, 4)
    with OnFakeDevice() as mode:
        outcome = task.probe(method, seed=0, device="meta")
    assert outcome.status == "ok" and not mode.mixed


def test_the_fake_device_raises_where_cuda_would():
    """Negative control of the stand-in: a CPU tensor beside device tensors raises (torch alone lets einsum of a
    meta and a CPU tensor pass); a 0-dim CPU scalar and explicit moves do not."""
    from fakedevice import OnFakeDevice

    with OnFakeDevice() as mode:
        a = torch.randn(2, 3, device="meta")
        with pytest.raises(RuntimeError, match="same device"):
            torch.einsum("bd,de->be", a, torch.randn(3, 4))
        assert (a * torch.tensor(2.0)).device.type == "meta"
        assert (a @ torch.randn(3, 4).to("meta")).device.type == "meta"
        assert a.cpu().shape == (2, 3) and a.cpu().device.type == "cpu"
    assert mode.mixed == ["einsum"]


# ---- mqar_state_sweep --------------------------------------------------------------------------------------------
def test_mqar_state_sweep_trains_one_model_per_width(tmp_path):
    cfg = {"tasks": ["mqar_state_sweep"], "methods": ["linear_attn", "decon_mlp"], "seeds": [0], "dtype": "float32",
           "device": "cpu", "results_dir": str(tmp_path), "run_id": "ss",
           "task_options": {"mqar_state_sweep": {"vocab": 64, "kv_pairs": 2, "seq_lens": [16], "d_model": 16,
                                                 "batch": 4, "steps": 3, "qk_dims": [2, 4], "eval_batches": 1}}}
    frame = pd.read_parquet(run_train(cfg, "test", show_progress=False) / "quality.parquet").set_index("method")
    row = frame.loc["linear_attn"]
    assert row.status == "ok" and row.kind == "experiment"
    assert set(json.loads(row.breakdown)) == {"n=2", "n=4"}
    state = json.loads(row.extras)["state"]
    assert state["n=4"]["linear_state_per_layer"] == 2 * 4 * 8  # nominal: heads x n x d_v
    # measured from the method's own decode state: S (n x d_v) and the normaliser z (n), per head
    assert state["n=4"]["state_source"] == "decode" and state["n=4"]["state_per_layer"] == 2 * 4 * (8 + 1)
    assert state["n=2"]["state_per_layer"] == 2 * 2 * (8 + 1)
    assert frame.loc["decon_mlp"].status == "unsupported"  # a layer-form method has no Q/K width


def test_the_sweeps_state_is_the_methods_own_measured_state():
    from attnbench.tasks.analysis import state_per_layer

    # exact attention: the KV cache; linear attention: S and z; performer: its m random features (not n) per head
    assert state_per_layer("sdpa_math", 2, 16, 32, 128, "float32", "cpu") == (2 * 128 * (16 + 32), "kv_cache")
    assert state_per_layer("linear_attn", 2, 16, 32, 128, "float32", "cpu") == (2 * 16 * 33, "decode")
    performer, _ = state_per_layer("performer", 2, 16, 32, 128, "float32", "cpu")
    assert performer % (2 * 33) == 0 and performer != 2 * 16 * 33
    # negative control: a method without a recurrent decode gets no figure, and the reason
    size, source = state_per_layer("lla", 2, 16, 32, 128, "float32", "cpu")
    assert size is None and source.startswith("undeclared")


def test_state_sizes_count_the_tensors_of_a_dataclass_state():
    from attnbench.methods.contract import tensor_bytes, tensor_elements
    from attnbench.methods.linear.common import LinearState

    state = LinearState(S=torch.zeros(1, 2, 3, 4), z=torch.zeros(1, 2, 3))
    assert tensor_elements(state) == 24 + 6 and tensor_bytes(state) == 4 * 30
    assert tensor_elements({"a": [state, torch.zeros(5)]}) == 35


def test_a_method_with_a_value_set_of_its_own_runs_with_a_narrower_qk_width():
    # tensor_attn's second value set v2 must be as wide as v (d_model / heads), not as q and k (qk_dim): the H200
    # plan's sweep hit "size of tensor a (4) must match ... (32)" before BuildContext carried v's width
    from attnbench.tasks.model import task_case

    case = task_case(method="tensor_attn", mask="causal", mask_name="causal", batch=2, heads_q=2, heads_kv=2,
                     seq_q=12, seq_kv=12, head_dim=4, dtype="float32", mode="fwd_bwd", seed=0, device="cpu")
    layer = MethodAttention(16, 2, case, "cpu", {}, {}, qk_dim=4)
    assert layer.prepared.extras["v2"].shape[-1] == 8 and layer.prepared.extras["k2"].shape[-1] == 4
    x = torch.randn(2, 12, 16, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 12, 16)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the exact recurrence's state is its KV cache, like exact attention's
    assert analysis.state_per_layer("softmax_rnn", 2, 4, 8, 12, "float32", "cpu") == (2 * 12 * 12, "kv_cache")


def test_token_extras_are_learned_maps_of_the_input_in_a_task_model():
    # gated linear attention's log-gates g (and the delta rule's β) are projections of x in the architectures; drawn
    # at random each step (the kernel harness's inputs) they made gated_delta_rule and simple_gla untrainable: MQAR
    # at chance after 2,000 steps on the CPU (results/cpu-analysis-state-long) while the ungated delta rule learned
    from attnbench.tasks.model import ExtraProjection, task_case

    case = task_case(method="gated_delta_rule", mask="causal", mask_name="causal", batch=2, heads_q=2, heads_kv=2,
                     seq_q=12, seq_kv=12, head_dim=8, dtype="float32", mode="fwd_bwd", seed=0, device="cpu")
    layer = MethodAttention(16, 2, case, "cpu", {}, {})
    assert set(layer.extra_maps) == {"g", "beta"}
    x = torch.randn(2, 12, 16)
    g = layer.extra_maps["g"](x, torch.float32)
    beta = layer.extra_maps["beta"](x, torch.float32)
    assert g.shape == beta.shape == (2, 2, 12) and g.dtype == torch.float32
    assert (g < 0).all() and g.mean() > -0.05  # a decay near 1 at initialisation: the state is kept
    assert ((beta > 0) & (beta < 1)).all()
    assert not torch.equal(layer.extra_maps["g"](x + 1, torch.float32), g)  # a function of the input
    out = layer(x.requires_grad_())
    out.sum().backward()
    grad = layer.extra_maps["g"].proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # trained through the method
    # the same call twice gives the same output (nothing drawn per step any more)
    assert torch.equal(layer(x.detach()), layer(x.detach()))
    # a bshd method's extras ([B, T, H]) are mapped in its own layout
    projection = ExtraProjection(16, type("E", (), {"shape": (2, 12, 2), "init": "uniform", "dtype": None})(), "bshd")
    assert projection(x, torch.float32).shape == (2, 12, 2)
