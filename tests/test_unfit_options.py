"""Method options that are valid but do not fit the case (a block, region or window longer than the sequence,
more regions or spans than the length holds) make an ``unsupported`` row whose reason names the option, not an
``error`` row: the methods' defaults are sized for long sequences, and a 128-token training task is simply
outside them (seen on the H200: biformer.region, halo.block and long_short.window defaults at 128 and 33
tokens gave "ValueError during training"). Options invalid whatever the length stay ``ValueError``."""
from __future__ import annotations

import json

import pytest
import torch

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute.case import CaseRunner
from attnbench.execute.train import TrainCase, run_case as run_train_case
from attnbench.methods import METHODS, BuildContext, MaskInfo, Unsupported
from attnbench.methods.sparse import common
from attnbench.tasks import task_params

TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "flush_l2": False}


def kernel_row(method, mask, opts, seq=128, dim=16):
    spec = masks.make_mask(mask)
    options = {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32,
               "method_options": {method: dict(opts)}}
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=seq,
                seq_kv=seq, head_dim=dim, dtype="float32", mode="fwd", seed=0)
    return CaseRunner("cpu", options).run(case)


# method, mask, options (empty: the method's defaults), the field the reason must name
UNFIT = [
    ("biformer", "full", {}, "method_options.biformer.region"),  # default region 256 > 128
    ("halo", "full", {}, "method_options.halo.block"),  # default block 256 > 128
    ("long_short", "causal", {}, "method_options.long_short.window"),  # default window 256 > 128
    ("biformer", "full", {"region": 16, "topk": 9}, "method_options.biformer.topk"),  # 8 regions at 128
    ("routing", "full", {"clusters": 1000}, "method_options.routing.clusters"),
    ("combiner_fixed", "full", {"segment": 256}, "method_options.combiner_fixed.segment"),
    ("combiner_axial", "full", {"segment": 256}, "method_options.combiner_axial.segment"),
    ("sparsifiner", "full", {"token_reduction": 256}, "method_options.sparsifiner.token_reduction"),
    ("sparsifiner", "full", {"channel_reduction": 32}, "method_options.sparsifiner.channel_reduction"),
    ("superlinear", "causal", {"num_spans": 99}, "method_options.superlinear.num_spans"),
    ("taylor_softmax", "full", {"form": "recurrent", "order": 4, "max_features": 100},
     "method_options.taylor_softmax.form"),  # head_dim 16 needs more features than allowed
]


@pytest.mark.parametrize("method, mask, opts, field", UNFIT, ids=[f"{m}-{f.rsplit('.', 1)[1]}" for m, _, _, f in UNFIT])
def test_an_option_that_does_not_fit_the_case_is_an_unsupported_row_naming_it(monkeypatch, method, mask, opts, field):
    monkeypatch.setattr(common, "ATTEND", common.dense_attend)  # no compiled FlexAttention on the CPU
    row = kernel_row(method, mask, opts)
    assert row["status"] == "unsupported", (row["status"], row["reason"])
    assert field in row["reason"]


def test_the_same_default_fits_a_long_enough_case(monkeypatch):
    """Control: the refusal comes from the length, not from the option (halo's default block runs at 512)."""
    monkeypatch.setattr(common, "ATTEND", common.dense_attend)
    row = kernel_row("halo", "full", {}, seq=512)
    assert row["status"] == "ok", row["reason"]


@pytest.mark.parametrize("method, opts, field", [
    ("halo", {"block": 0}, "method_options.halo.block: must be >= 1"),
    ("biformer", {"region": -4}, "method_options.biformer.region: must be >= 1"),
    ("biformer", {"region": 256, "topk": 0}, "method_options.biformer.topk: must be >= 1"),  # bad AND unfit
    ("biformer", {"region": 256, "impl": "nope"}, "method_options.biformer.impl: must be one of"),
    ("long_short", {"window": 255}, "method_options.long_short.window: must be even"),
    ("routing", {"clusters": 1000, "ema_decay": 2.0}, "method_options.routing.ema_decay"),
    ("combiner_fixed", {"segment": 256, "impl": "nope"}, "method_options.combiner_fixed.impl"),
])
def test_options_invalid_whatever_the_length_are_still_errors(method, opts, field):
    """A bad value is a config error even when the case is also too short for it (checked first)."""
    spec = masks.make_mask("full")
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=2, seq_q=128,
                seq_kv=128, head_dim=16, dtype="float32", mode="fwd", seed=0)
    bound = spec.bind(128, 128)
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                       dtype=torch.float32, params=dict(opts))
    with pytest.raises(ValueError) as info:
        METHODS[method].build(ctx)
    assert not isinstance(info.value, Unsupported)
    assert field in str(info.value)


@pytest.mark.parametrize("method, field", [("halo", "method_options.halo.block"),
                                           ("biformer", "method_options.biformer.region")])
def test_a_training_task_shorter_than_the_default_block_is_an_unsupported_row(method, field):
    """The training path (bench/execute/train.run_case) yields the row the H200 run should have had."""
    params = task_params("mqar", dict(d_model=16, heads=2, layers=1, batch=2, steps=1, eval_batches=1, warmup=1,
                                      vocab=256, kv_pairs=2))
    case = TrainCase("mqar", method, 128, 0, "float32", json.dumps(params, sort_keys=True))
    row = run_train_case(case, "cpu", {}, {}, timeout_s=30)
    assert row["status"] == "unsupported", (row["status"], row["reason"])
    assert field in row["reason"]
