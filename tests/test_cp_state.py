"""Linear / recurrent methods under context parallelism by state passing (``state_pass``): the methods'
state scans (summary, combine, finish) rebuild the single-device output from pieces; gangs of 2 and 4 gloo
ranks match the single-device method (values and gradients, gates included) and catch a dropped or a
detached incoming state; the planner gives every other combination an ``unsupported`` row with its reason.
Tiny shapes (seq 24, head dim 8)."""
from __future__ import annotations

import copy
import dataclasses

import pandas as pd
import pytest
import torch

from attnbench import masks
from attnbench.config.plan import Case, build_plan
from attnbench.execute.runner import run_sweep
from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared

from conftest import BASE
from test_cp import TIMING, gang

SEQ, HEADS, DIM = 24, 4, 8
SCANNED = [("linear_attn", "causal"), ("linear_attn", "full"), ("cosformer", "causal"), ("simple_gla", "causal"),
           ("delta_rule", "causal"), ("gated_delta_rule", "causal")]


def make_case(method, mask, mode="fwd_bwd", layout="single", world=1, seed=0):
    return Case(method=method, mask=mask, mask_name=mask, batch=1, heads_q=HEADS, heads_kv=HEADS, seq_q=SEQ,
                seq_kv=SEQ, head_dim=DIM, dtype="float32", mode=mode, layout=layout, world_size=world, seed=seed)


def prepared(method, mask):
    case = make_case(method, mask)
    bound = masks.make_mask(mask).bind(SEQ, SEQ)
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                       dtype=torch.float32, options={}, params={"chunk": 4})
    return as_prepared(METHODS[method].build(ctx))


def scan_in_pieces(prep, causal, q, k, v, kw, cuts, combine=None, drop=False):
    """Every piece summarised, the summaries of the pieces each one sees folded in order, then finished."""
    scan = prep.state_scan
    combine = combine or scan.combine
    pieces = list(zip(cuts[:-1], cuts[1:]))

    def local(a, b):
        return {n: (t[:, :, a:b] if n in scan.token_extras else t) for n, t in kw.items()}

    summaries = [scan.summary(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], torch.arange(a, b), **local(a, b))
                 for a, b in pieces]
    outs = []
    for i, (a, b) in enumerate(pieces):
        incoming = None
        for j in (range(i) if causal else [j for j in range(len(pieces)) if j != i]):
            incoming = summaries[j] if incoming is None else combine(incoming, summaries[j])
        outs.append(scan.finish(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], torch.arange(a, b),
                                None if drop else incoming, **local(a, b)))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("method,mask", SCANNED)
def test_state_scan_pieces_rebuild_the_whole_sequence(method, mask):
    prep = prepared(method, mask)
    assert prep.state_scan is not None
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, HEADS, SEQ, DIM, generator=gen) for _ in range(3))
    kw = {name: extra.make(gen, "cpu", torch.float32) for name, extra in prep.extras.items()}
    whole = prep.fn(q, k, v, **kw)
    causal = mask == "causal"
    cuts = [0, 5, 13, 24]  # uneven pieces, not multiples of the chunk
    got = scan_in_pieces(prep, causal, q, k, v, kw, cuts)
    assert torch.allclose(got, whole, atol=2e-6, rtol=1e-5), (got - whole).abs().max()
    # negative controls: without the incoming state, and (gated methods) summing summaries without the decay
    dropped = scan_in_pieces(prep, causal, q, k, v, kw, cuts, drop=True)
    assert (dropped - whole).abs().max() > 1e-2
    if prep.extras.get("g") is not None:
        summed = scan_in_pieces(prep, causal, q, k, v, kw, cuts,
                                combine=lambda a, b: tuple(x + y for x, y in zip(a, b)))
        assert (summed - whole).abs().max() > 1e-2


DROP, DETACH = 91, 92


def test_state_pass_on_two_ranks_matches_one_device(tmp_path):
    cases = [make_case("linear_attn", "causal", mode, "state_pass", 2) for mode in ("fwd", "fwd_bwd")]
    cases += [make_case("linear_attn", "full", "fwd_bwd", "state_pass(balance=zigzag)", 2),
              make_case("simple_gla", "causal", "fwd_bwd", "state_pass", 2),
              make_case("performer", "causal", "fwd", "state_pass", 2),  # prepared random features, shared
              make_case("linear_attn", "causal", "fwd_bwd", "ulysses", 2)]  # own reference under ulysses
    controls = [make_case("linear_attn", "causal", "fwd", "state_pass", 2, seed=DROP),
                make_case("simple_gla", "causal", "fwd_bwd", "state_pass", 2, seed=DETACH)]
    declined = [make_case("abc", "causal", "fwd", "state_pass", 2),  # no state scan
                make_case("linear_attn", "causal", "fwd", "state_pass(balance=zigzag)", 2)]
    with gang(2, tmp_path, cp_drop_state_seed=DROP, cp_detach_state_seed=DETACH) as running:
        rows = [running.run(case, "t", 120) for case in cases + controls + declined]
    ok, bad, no = rows[:len(cases)], rows[len(cases):len(cases) + 2], rows[len(cases) + 2:]
    assert [r["status"] for r in ok] == ["ok"] * len(cases), [r.get("reason") for r in ok]
    assert all(r["rel_err"] < 1e-5 and r["cp_kernel"] == c.method for r, c in zip(ok, cases))
    state_bytes = 4 * HEADS * (DIM * DIM + DIM)  # linear_attn: S [H, m, dv] and z [H, m], fp32
    assert ok[0]["comm_bytes"] == state_bytes and ok[1]["comm_bytes"] == 2 * state_bytes  # gather; + its adjoint
    assert [r["status"] for r in bad] == ["wrong", "wrong"], [r.get("reason") for r in bad]
    assert bad[0]["reason"].startswith("out ") and bad[0]["rel_err"] > 100 * bad[0]["err_tol"]
    assert bad[1]["reason"].split()[0] in ("dq", "dk", "dv", "dg"), bad[1]["reason"]  # outputs right, gradients not
    assert [r["status"] for r in no] == ["unsupported", "unsupported"]
    assert "no state scan" in no[0]["reason"] and "contiguous" in no[1]["reason"]


def test_state_pass_on_four_ranks(tmp_path):
    cases = [make_case("linear_attn", "causal", "fwd_bwd", "state_pass", 4),
             make_case("gated_delta_rule", "causal", "fwd_bwd", "state_pass", 4)]
    with gang(4, tmp_path, cp_drop_state_seed=DROP) as running:
        rows = [running.run(case, "t", 120) for case in cases]
        dropped = running.run(dataclasses.replace(cases[1], seed=DROP), "t", 120)
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("reason") for r in rows]
    assert all(r["rel_err"] < 1e-5 for r in rows)
    assert dropped["status"] == "wrong"


@pytest.fixture
def state_cfg(tmp_path):
    config = copy.deepcopy(BASE)
    config.update(results_dir=str(tmp_path / "results"), run_id="cp_state", seq_lens=[SEQ], heads_q=HEADS,
                  heads_kv=HEADS, head_dim=DIM, timing=dict(TIMING, max_reps=2), masks=["causal"], modes=["fwd"],
                  methods=["linear_attn", "sdpa_math"], layouts=["single", "state_pass", "ring"], cp=[2])
    return config


def test_sweep_with_state_pass_gives_a_row_per_case(state_cfg):
    plan = build_plan(dict(state_cfg, cp_balance=["contiguous", "zigzag"]))
    reasons = {(c.method, c.layout): r for c, r in plan.unsupported}
    assert "softmax attention" in reasons[("sdpa_math", "state_pass")]
    assert "state_pass" in reasons[("linear_attn", "ring")]
    assert "contiguous pieces" in reasons[("linear_attn", "state_pass(balance=zigzag)")]
    assert ("linear_attn", "state_pass") in {(c.method, c.layout) for c in plan.runnable}

    frame = pd.read_parquet(run_sweep(state_cfg, "test", show_progress=False) / "rows.parquet")
    rows = frame.set_index(["method", "layout"])
    assert len(frame) == 6
    assert rows.loc[("linear_attn", "state_pass"), "status"] == "ok", rows["reason"].to_dict()
    assert rows.loc[("linear_attn", "state_pass"), "world_size"] == 2
    assert rows.loc[("sdpa_math", "ring"), "status"] == "ok"
    assert rows.loc[("sdpa_math", "state_pass"), "status"] == "unsupported"
    assert rows.loc[("linear_attn", "ring"), "status"] == "unsupported"
