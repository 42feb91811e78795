"""Context parallelism on the CPU with gloo: every layout x full, causal, document and sliding-window masks
x fwd and fwd_bwd on gangs of 2 and 3 processes (an odd world size), against the single-process fp32
reference; a ring that drops one KV chunk is caught as wrong; rank failures give their status and the gang
is replaced; torch's context_parallel is always undone. Tiny shapes (seq 36, head dim 8)."""
from __future__ import annotations

import contextlib
import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from attnbench import masks
from attnbench.config.plan import Case, ConfigError, build_plan
from attnbench.cp import layouts, shard, tiles
from attnbench.cp.gang import Gang
from attnbench.cp.guard import cp_module, guarded_context_parallel
from attnbench.cp.kernels import tile_block_mask
from attnbench.execute.runner import run_sweep, worker_options

from conftest import BASE, TESTS

SEQ, HEADS, HEADS_KV, DIM = 36, 6, 3, 8
MASKS = ["full", "causal", "document(lengths=[7,17,12])", "sliding_window(left=5)"]
TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 1}
CP_FAULTY = str(TESTS / "plugins" / "cp_faulty.py")


def make_case(layout, mask, mode, world, method="sdpa_math", seed=0):
    return Case(method=method, mask=masks.make_mask(mask).label, mask_name=mask.split("(")[0], batch=1,
                heads_q=HEADS, heads_kv=HEADS_KV, seq_q=SEQ, seq_kv=SEQ, head_dim=DIM, dtype="float32", mode=mode,
                layout=layout, world_size=world, seed=seed)


@contextlib.contextmanager
def gang(world, tmp_path, **extra):
    options = worker_options({"timing": TIMING})
    options.update(extra)
    running = Gang(world, ["cpu"], options, [], tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def kv_bytes(length, elem=4):
    return 2 * 1 * HEADS_KV * length * DIM * elem  # k and v of one shard


# ---- every layout, on 2 and 3 ranks ----------------------------------------------------------------------
LAYOUTS = {
    2: ["ring(balance=zigzag)", "ring_allgather", "ulysses(balance=zigzag)", "usp(ulysses=2)"],
    3: ["ring", "ring_allgather(balance=zigzag)", "ulysses", "usp(balance=zigzag,ulysses=3)"],
}


DROP_SEED = 99  # cases with this seed run a ring that skips the keys of its second step (negative control)


@pytest.mark.parametrize("world", [2, 3])
def test_every_layout_matches_one_device(world, tmp_path):
    cases = [make_case(layout, mask, mode, world) for layout in LAYOUTS[world] for mask in MASKS
             for mode in ("fwd", "fwd_bwd")]
    # per-document balancing on the document mask; the flash CPU kernel (whose backward takes the global
    # log-sum-exp, the GPU kernels' path) on full and causal tiles
    cases += [make_case("ring(balance=per_document)", MASKS[2], mode, world) for mode in ("fwd", "fwd_bwd")]
    cases += [make_case(layout, mask, "fwd_bwd", world, method="sdpa_flash") for mask in ("full", "causal")
              for layout in ("ring(balance=zigzag)", "ring_allgather(balance=zigzag)")]
    # negative control: the same gang, a ring that drops one KV chunk, forward and backward
    dropped = [make_case("ring", "full", mode, world, seed=DROP_SEED) for mode in ("fwd", "fwd_bwd")]
    with gang(world, tmp_path, cp_drop_chunk_seed=DROP_SEED) as running:
        rows = [running.run(case, "t", 120) for case in cases]
        dropped_rows = [running.run(case, "t", 120) for case in dropped]
    bad = [(c.layout, c.mask, c.mode, r["status"], r.get("rel_err"), r.get("reason")) for c, r in zip(cases, rows)
           if r["status"] != "ok" or not r["rel_err"] <= r["err_tol"]]
    assert not bad, bad
    for case, row in zip(cases, rows):
        assert row["world_size"] == world and row["layout"] == case.layout
        assert row["rel_err"] < 1e-5, (case, row["rel_err"])
        assert len(row["rank_ms"].split(";")) == world and row["ms_rank_max"] >= row["ms_rank_mean"] > 0
        if case.layout.startswith("ring(") or case.layout == "ring":  # bytes from the algorithm
            length = SEQ // world
            fwd = (world - 1) * kv_bytes(length)
            expect = fwd if case.mode == "fwd" else fwd + (world - 1) * kv_bytes(length) + world * kv_bytes(length)
            if case.layout != "ring(balance=per_document)":
                assert row["comm_bytes"] == expect, (case.layout, case.mode, row["comm_bytes"], expect)
        if case.layout.startswith("ring_allgather") and case.mode == "fwd":
            assert row["comm_bytes"] == (world - 1) * kv_bytes(SEQ // world)
    assert [r["status"] for r in dropped_rows] == ["wrong", "wrong"], [r.get("reason") for r in dropped_rows]
    assert "disagrees with one device" in dropped_rows[0]["reason"]
    assert dropped_rows[0]["rel_err"] > 100 * dropped_rows[0]["err_tol"]


def test_four_ranks_usp_grid(tmp_path):
    """A real 2 x 2 grid: Ulysses pairs, rings across them."""
    cases = [make_case("usp(balance=zigzag,ulysses=2)", mask, "fwd_bwd", 4) for mask in ("causal", MASKS[2])]
    with gang(4, tmp_path) as running:
        rows = [running.run(case, "t", 120) for case in cases]
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("reason") for r in rows]
    assert all(r["rel_err"] < 1e-5 for r in rows)


# ---- the runner: axes, rows, speed-up, failures ------------------------------------------------------------
@pytest.fixture
def cp_cfg(tmp_path):
    config = copy.deepcopy(BASE)
    config.update(results_dir=str(tmp_path / "results"), run_id="cp", seq_lens=[SEQ], heads_q=HEADS, heads_kv=HEADS_KV,
                  head_dim=DIM, timing=dict(TIMING, max_reps=2), masks=["causal"], methods=["sdpa_math"])
    return config


def test_runner_runs_cp_layouts_after_single_and_records_scaling(cp_cfg):
    cp_cfg.update(layouts=["single", "ring", "ring_allgather"], cp=[2], cp_balance=["zigzag"], modes=["fwd_bwd"])
    run_dir = run_sweep(cp_cfg, "test", show_progress=False)
    frame = pd.read_parquet(run_dir / "rows.parquet").set_index("layout")
    assert set(frame.index) == {"single", "ring(balance=zigzag)", "ring_allgather(balance=zigzag)"}
    assert (frame["status"] == "ok").all(), frame["reason"].to_dict()
    single = frame.loc["single"]
    for label in ("ring(balance=zigzag)", "ring_allgather(balance=zigzag)"):
        row = frame.loc[label]
        assert row["world_size"] == 2 and row["cp_balance"] == "zigzag" and row["cp_kernel"] == "math"
        assert row["single_ms"] == pytest.approx(single["ms_median"])
        assert row["speedup"] == pytest.approx(single["ms_median"] / row["ms_median"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / 2)
        assert row["imbalance"] == pytest.approx(row["ms_rank_max"] / row["ms_rank_mean"])
        assert row["comm_bytes"] > 0 and row["flops"] == single["flops"]
        if row["speedup"] > 2:
            assert "speedup_above_world_size" in row["flags"]
    again = run_sweep(cp_cfg, "test", show_progress=False)  # resume: nothing runs twice
    assert len(pd.read_parquet(again / "rows.parquet")) == 3


@pytest.mark.slow  # four gangs start, t_cp_rank1_hangs waits out its 6 s
def test_rank_failures_get_their_status_and_the_gang_is_replaced(cp_cfg):
    # case_timeout_s: the good case must finish within it on a busy 2-core box. Under pytest-xdist 4 s once cut
    # t_cp_zgood, both ranks still "queued", while each rank imported torch._dynamo (~1.5 s of CPU) inside the
    # case's timed window; now the case takes well under 1 s at load ~6 on 2 cores. Only the hanging case waits
    cp_cfg.update(plugins=[CP_FAULTY], layouts=["ulysses"], cp=[2], case_timeout_s=6, modes=["fwd"],
                  methods=["t_cp_rank1_raises", "t_cp_rank1_dies", "t_cp_rank1_hangs", "t_cp_zgood"])
    frame = pd.read_parquet(run_sweep(cp_cfg, "test", show_progress=False) / "rows.parquet").set_index("method")
    status = frame["status"].to_dict()
    assert status == {"t_cp_rank1_raises": "error", "t_cp_rank1_dies": "crashed", "t_cp_rank1_hangs": "timeout",
                      "t_cp_zgood": "ok"}, frame["reason"].to_dict()
    assert "rank 1" in frame.loc["t_cp_rank1_raises", "reason"] and "deliberate" in frame.loc["t_cp_rank1_raises", "reason"]
    assert "rank 1 died with exit code 3" in frame.loc["t_cp_rank1_dies", "reason"]
    assert "rank 1" in frame.loc["t_cp_rank1_hangs", "reason"] and "6 s" in frame.loc["t_cp_rank1_hangs", "reason"]


def test_plan_axes_and_unsupported_reasons(cp_cfg):
    cp_cfg.update(layouts=["single", "ring", "usp", "torch_cp", "yunchang_ulysses"], cp=[2, 3],
                  cp_balance=["contiguous", "per_document"], methods=["sdpa_math", "sdpa_flash", "flex", "torch_varlen"],
                  masks=["causal"], modes=["fwd_bwd"])
    plan = build_plan(cp_cfg)
    layouts_seen = {(c.layout, c.world_size) for c in plan.runnable} | {(c.layout, c.world_size)
                                                                        for c, _ in plan.unsupported}
    assert ("single", 1) in layouts_seen and ("ring", 3) in layouts_seen and ("usp(balance=per_document)", 2) in layouts_seen
    reasons = {(c.method, c.layout, c.world_size): r for c, r in plan.unsupported}
    assert "packed-document mask" in reasons[("sdpa_math", "ring(balance=per_document)", 2)]
    assert "CUDA only" in reasons[("sdpa_flash", "torch_cp", 2)]
    assert "flash, efficient or cuDNN" in reasons[("sdpa_math", "torch_cp", 2)]
    assert "no backward on CPU" in reasons[("flex", "ring", 2)]
    assert "no CP chunk kernel" in reasons[("torch_varlen", "ring", 2)]
    assert "yunchang" in reasons[("sdpa_math", "yunchang_ulysses", 2)]
    assert all(c.layout != "single" or c.world_size == 1 for c in plan.runnable)
    for field, value, text in (("layouts", ["spiral"], "spiral"), ("cp", [0], "positive"),
                               ("cp_balance", ["diagonal"], "diagonal"), ("cp", [5], "do not divide")):
        bad = dict(cp_cfg, layouts=["ring"], **{field: value}) if field != "layouts" else dict(cp_cfg, layouts=value)
        with pytest.raises(ConfigError) as info:
            build_plan(bad)
        assert info.value.field == field and text in str(info.value)


# ---- torch's context_parallel never leaks --------------------------------------------------------------
def test_guard_undoes_a_context_parallel_that_leaks_on_exceptions():
    """torch 2.11's context_parallel restores SDPA only on a normal exit: the guard restores it always."""
    original = F.scaled_dot_product_attention

    def patched(*args, **kwargs):
        raise AssertionError("patched SDPA called")

    @contextlib.contextmanager
    def leaky(mesh, buffers, buffer_seq_dims, no_restore_buffers):
        F.scaled_dot_product_attention = patched
        yield
        F.scaled_dot_product_attention = original  # no try/finally: skipped on an exception

    try:  # negative control: unguarded, an exception leaves SDPA patched
        with pytest.raises(RuntimeError), leaky(None, [], [], set()):
            raise RuntimeError("case failed")
        assert F.scaled_dot_product_attention is patched
    finally:
        F.scaled_dot_product_attention = original
    with pytest.raises(RuntimeError), guarded_context_parallel(None, [torch.zeros(1)], [0], context_parallel=leaky):
        assert F.scaled_dot_product_attention is patched
        raise RuntimeError("case failed")
    assert F.scaled_dot_product_attention is original


def test_failed_torch_cp_case_does_not_affect_a_later_case(tmp_path):
    """In one process: a torch_cp case that raises inside torch's real context_parallel, then a plain SDPA
    case and a ring case, both right."""
    import torch.distributed as dist

    from attnbench.cp.gang import free_port
    from attnbench.cp.rankcase import RankRunner, process_group
    from attnbench.execute.case import CaseRunner

    original = F.scaled_dot_product_attention
    balance = cp_module()._cp_options.enable_load_balance
    options = worker_options({"timing": TIMING})
    with process_group("gloo", 0, 1, free_port()):
        runner = RankRunner(0, 1, "cpu", dict(options, cp_fail_inside=True))
        failing = make_case("torch_cp(balance=zigzag)", "causal", "fwd", 1, method="sdpa_flash")
        with pytest.raises(RuntimeError, match=r"deliberate failure inside context_parallel \(SDPA patched: True\)"):
            runner.run(failing)
        assert F.scaled_dot_product_attention is original
        assert cp_module()._cp_options.enable_load_balance == balance
        later = RankRunner(0, 1, "cpu", options).run(make_case("ring", "causal", "fwd_bwd", 1))
        assert later["status"] == "ok" and later["rel_err"] < 1e-5
    assert not dist.is_initialized()
    row = CaseRunner("cpu", options).run(dataclass_replace(failing, layout="single", world_size=1, method="sdpa_flash"))
    assert row["status"] == "ok" and row["rel_err"] < 1e-5


def dataclass_replace(case, **changes):
    import dataclasses

    return dataclasses.replace(case, **changes)


# ---- pieces: shards, tiles, block masks, labels ------------------------------------------------------------
def test_shards_cover_every_position_once():
    bound = masks.make_mask(MASKS[2]).bind(SEQ)
    for balance in shard.BALANCES:
        for world in (1, 2, 3, 4):
            shards = shard.make_shards(balance, SEQ, world, bound)
            positions = torch.cat([s.positions() for s in shards])
            assert torch.equal(positions.sort().values, torch.arange(SEQ)), (balance, world)
    zigzag = shard.make_shards("zigzag", 12, 3)
    assert zigzag[0].positions().tolist() == [0, 1, 10, 11] and zigzag[1].positions().tolist() == [2, 3, 8, 9]
    per_doc = shard.make_shards("per_document", SEQ, 2, bound)
    # every document split head-tail: rank 0 holds each document's first and last quarter
    # (7 tokens: pieces of 2, 2, 2, 1; rank 0 holds the first and the last, then the next document's first)
    assert per_doc[0].positions().tolist()[:4] == [0, 1, 6, 7]


@pytest.mark.parametrize("label", ["full", "causal", "sliding_window(left=5)", "document(lengths=[7,17,12])",
                                   "dilated_sliding_window(left=3,dilation=2)", "shared_question(question=8,num_answers=3)",
                                   "block_causal_document(lengths=[10,20,6],frame=4)"])
def test_tile_calls_rebuild_the_mask_exactly(label):
    bound = masks.make_mask(label).bind(SEQ)
    dense = bound.dense()
    for balance in ("contiguous", "zigzag"):
        shards = shard.make_shards(balance, SEQ, 3)
        for any_mask in (True, False):
            for q_shard in shards:
                for kv_shard in shards + [shard.concat(shards)]:
                    try:
                        tile = tiles.plan_tile(bound, q_shard, kv_shard, any_mask)
                    except tiles.TileUnsupported:
                        assert not any_mask
                        continue
                    qp, kp = q_shard.positions(), kv_shard.positions()
                    want = dense[qp][:, kp]
                    got = torch.zeros_like(want)
                    for call in tile.calls:
                        block = torch.ones(call.q1 - call.q0, call.k1 - call.k0, dtype=torch.bool)
                        if call.kind == "causal":
                            block = block.tril()
                        elif call.kind == "masked":
                            block = tiles.PositionMask(bound, call.q_pos, call.kv_pos).dense()
                        assert not got[call.q0:call.q1, call.k0:call.k1].any()  # calls never overlap
                        got[call.q0:call.q1, call.k0:call.k1] = block
                    assert torch.equal(got, want), (label, balance, any_mask)
                    assert tile.visible_pairs == int(want.sum())


def test_full_and_causal_run_without_masked_tiles():
    """The native-kernel path: zigzag causal tiles are full, empty or causal squares only."""
    bound = masks.make_mask("causal").bind(SEQ)
    shards = shard.make_shards("zigzag", SEQ, 3)
    kinds = {call.kind for q in shards for kv in shards for call in tiles.plan_tile(bound, q, kv, False).calls}
    assert kinds == {"full", "causal"}
    with pytest.raises(tiles.TileUnsupported):
        tiles.plan_tile(masks.make_mask("sliding_window(left=2)").bind(SEQ), shards[0], shards[0], False)


def test_tile_block_mask_matches_the_dense_tile():
    pytest.importorskip("torch.nn.attention.flex_attention")
    bound = masks.make_mask("document(lengths=[7,17,12])").bind(SEQ)
    shards = shard.make_shards("zigzag", SEQ, 2)
    tile = tiles.plan_tile(bound, shards[0], shard.concat(shards), True)
    (call,) = tile.calls
    block = 4
    mask = tile_block_mask(bound, call, "cpu", block)
    dense = tiles.PositionMask(bound, call.q_pos, call.kv_pos).dense()
    nq, nk = -(-dense.shape[0] // block), -(-dense.shape[1] // block)
    padded = torch.nn.functional.pad(dense, (0, nk * block - dense.shape[1], 0, nq * block - dense.shape[0]))
    any_visible = padded.view(nq, block, nk, block).any(dim=3).any(dim=1)
    assert torch.equal(mask.to_dense()[0, 0].bool(), any_visible)


def test_layout_labels():
    assert layouts.parse_layout("ring").label == "ring"
    spec = layouts.parse_layout("usp(balance=zigzag,ulysses=2)")
    assert (spec.name, spec.balance, spec.ulysses, spec.label) == ("usp", "zigzag", 2, "usp(balance=zigzag,ulysses=2)")
    for bad in ("spiral", "ring(balance=diagonal)", "usp(ulysses=0)", "ring(speed=2)"):
        with pytest.raises(ValueError):
            layouts.parse_layout(bad)


def test_device_script_steps_compose_and_plan_on_two_gpus(monkeypatch):
    """Every attnbench invocation of scripts/device_cp2.sh composes (sweep=cp + its overrides) and plans on a
    2-GPU machine: CP cases runnable, single rows at the lengths the speed-ups need."""
    import re
    import shlex

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import attnbench.config.plan

    script = (TESTS.parent / "scripts" / "device_cp2.sh").read_text()
    cp_args = shlex.split(re.search(r"^CP=\((.*)\)$", script, re.M).group(1))
    steps = []
    for line in script.splitlines():
        match = re.match(r"^\s*\{?\s*ab \S+ (.*?)(?:>.*)?;?\s*\}?\s*$", line)
        if match and "()" not in line:
            args = shlex.split(match.group(1).replace('"${CP[@]}"', " ".join(cp_args)).rstrip("; }"))
            steps.append([a for a in args if "=" in a])
    assert len(steps) == 5, steps
    monkeypatch.setattr(attnbench.config.plan, "resolve_devices", lambda cfg: ["cuda:0", "cuda:1"])
    planned = []
    for overrides in steps:
        with initialize_config_dir(config_dir=str(TESTS.parent / "conf"), version_base="1.3"):
            cfg = OmegaConf.to_container(compose(config_name="config", overrides=["sweep=cp", *overrides]), resolve=True)
        plan = build_plan(cfg)
        planned.append(plan)
        assert plan.runnable, overrides
    singles = {(c.mask, c.seq_q) for c in planned[0].runnable}
    assert {("full", 65536), ("causal", 65536), ("full", 131072)} <= singles
    cp_runnable = [c for plan in planned[1:] for c in plan.runnable]
    assert {c.world_size for c in cp_runnable} == {2}
    assert {c.layout for c in cp_runnable} >= {"ring", "ring_allgather", "ulysses", "usp(ulysses=2)", "torch_cp",
                                               "ring(balance=zigzag)", "torch_cp(balance=zigzag)"}
    assert {c.seq_q for c in cp_runnable} == {65536, 131072, 524288}
