"""Planner: validation names the field before any work; capability filtering; FLOP formula."""
from __future__ import annotations

import copy

import pytest

from attnbench.config.plan import Case, ConfigError, build_plan
from attnbench.record.rows import case_bytes, case_flops, describe
from attnbench.execute.runner import run_sweep
from conftest import BASE


def _cfg(**changes):
    cfg = copy.deepcopy(BASE)
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"methods": ["nope"]}, "methods", "unknown method 'nope'"),
        ({"methods": []}, "methods", "empty"),
        ({"masks": ["nope"]}, "masks", "unknown mask"),
        ({"masks": ["causal(align='sideways')"]}, "masks", "align"),
        ({"masks": ["causal(bogus=1)"]}, "masks", "unknown parameter"),
        ({"seq_lens": [0]}, "seq_lens", "positive integers"),
        ({"seq_lens": ["1k"]}, "seq_lens", "positive integers"),
        ({"seq_lens": [-4]}, "seq_lens", "positive integers"),
        ({"cross_lens": [[8]]}, "cross_lens", "[seq_q, seq_kv]"),
        ({"heads_q": 8, "heads_kv": 3}, "heads_kv", "does not divide heads_q=8"),
        ({"head_dim": 0}, "head_dim", "positive"),
        ({"batch": 1.5}, "batch", "positive integers"),
        ({"batch": None, "tokens": -1}, "tokens", "positive integer"),
        ({"dtype": "float8"}, "dtype", "float32, float16, bfloat16"),
        ({"modes": ["sideways"]}, "modes", "fwd, bwd, fwd_bwd, decode"),
        ({"seed": -1}, "seed", "non-negative"),
        ({"device": "tpu"}, "device", "auto, cpu, cuda"),
        ({"timing": {"budget_ms": 0}}, "timing.budget_ms", ">= 1"),
        ({"timing": {"bogus": 1}}, "timing.bogus", "unknown key"),
        ({"timing": {"budgetms": 1}}, "timing.budgetms", "did you mean 'budget_ms'"),
        ({"timing": {"flush_l2": "yes"}}, "timing.flush_l2", "true or false"),
        ({"correctness": {"ref_chunk_mb": 0}}, "correctness.ref_chunk_mb", ">= 1"),
        ({"correctness": {"tolerance": {"float8": 0.1}}}, "correctness.tolerance", "float32, float16, bfloat16"),
        ({"correctness": {"tolerance": {"bfloat16": [0.01]}}}, "correctness.tolerance.bfloat16", "[out, grads]"),
        ({"foo": 1}, "foo", "unknown key"),
        ({"flex_block_size": "abc"}, "flex_block_size", "power of two"),
        ({"flex_block_size": 48}, "flex_block_size", "power of two"),
        ({"seq_lens": [], "cross_lens": []}, "seq_lens", "cross_lens"),
        ({"seq_lens": [2**40]}, "seq_lens", "2**31"),
        ({"run_id": "../../escape"}, "run_id", "plain folder name"),
        ({"run_id": "/tmp/abs"}, "run_id", "plain folder name"),
        ({"run_id": "a/b"}, "run_id", "plain folder name"),
        ({"run_id": ".."}, "run_id", "plain folder name"),
        ({"run_id": "."}, "run_id", "plain folder name"),
        ({"method_options": {"nope": {"k": 1}}}, "method_options.nope", "not a registered method"),
        ({"method_options": {"sdpa_math": 3}}, "method_options.sdpa_math", "mapping"),
        ({"method_options": [1]}, "method_options", "mapping"),
        ({"masks": [None]}, "masks", "no empty entry"),
        ({"retry": ["ok"]}, "retry", "statuses among"),
        ({"timing": {"min_reps": 10, "max_reps": 2}}, "timing.min_reps", "exceeds"),
        ({"case_timeout_s": 0}, "case_timeout_s", ">= 1"),
        ({"layout": "ring"}, "layout", "single"),
    ],
)
def test_invalid_input_is_rejected_naming_the_field(changes, field, words):
    with pytest.raises(ConfigError) as info:
        build_plan(_cfg(**changes))
    assert f"'{field}'" in str(info.value)
    assert words in str(info.value)


def test_invalid_input_fails_before_any_work(tmp_path):
    cfg = _cfg(results_dir=str(tmp_path / "r"), run_id="x", heads_q=8, heads_kv=3)
    with pytest.raises(ConfigError):
        run_sweep(cfg, "test", show_progress=False)
    assert not (tmp_path / "r").exists()


def test_cuda_device_without_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        build_plan(_cfg(device="cuda"))


def test_capability_filtering_gives_reasons():
    plan = build_plan(_cfg(methods=["sdpa_cudnn", "flash_attn", "sdpa_math", "flex"], modes=["fwd", "bwd"],
                           dtype=["float32"]))
    reasons = {(c.method, c.mode): r for c, r in plan.unsupported}
    assert "cuda" in reasons[("sdpa_cudnn", "fwd")]
    assert "flash_attn" in reasons[("flash_attn", "fwd")] and "unavailable" in reasons[("flash_attn", "fwd")]
    runnable = {(c.method, c.mode) for c in plan.runnable}
    assert ("sdpa_math", "bwd") in runnable and ("flex", "fwd") in runnable
    assert plan.total == 2 * 2 * 4  # masks x modes x methods


def test_materialising_methods_refuse_over_budget():
    plan = build_plan(_cfg(methods=["eager"], seq_lens=[4096], heads_q=16, materialize_budget_mb=64))
    (case, reason), = [u for u in plan.unsupported if u[0].mask == "full"]
    assert "materialises" in reason and "GiB" in reason


def test_dense_mask_budget_refuses_with_the_size_needed(monkeypatch):
    from attnbench import masks

    masks.register_mask_mod("t_checker", lambda b, h, q, kv: ((q + kv) % 2) == 0)
    # unregistered after the test: tests that list the masks (test_masks_tools.py, ...) may run later here
    monkeypatch.setitem(masks.MASKS, "t_checker", masks.MASKS.pop("t_checker"))
    plan = build_plan(_cfg(methods=["sdpa_math"], masks=["t_checker"], seq_lens=[4096], dense_mask_budget_mb=1))
    (case, reason), = plan.unsupported
    # an additive bias in the working dtype (float32 here): 4096 x 4096 x 4 bytes
    assert "dense mask would need 64 MiB" in reason


def test_cases_sharing_inputs_run_together():
    plan = build_plan(_cfg(methods=["reference", "sdpa_math", "eager"], seq_lens=[16, 32], modes=["fwd", "fwd_bwd"]))
    keys = [c.input_key() for c in plan.runnable]
    changes = sum(1 for a, b in zip(keys, keys[1:]) if a != b)
    assert changes == len(set(keys)) - 1


def _case(**kw):
    base = dict(method="sdpa_math", mask="full", mask_name="full", batch=2, heads_q=4, heads_kv=2, seq_q=64,
                seq_kv=64, head_dim=32, dtype="bfloat16", mode="fwd")
    base.update(kw)
    return Case(**base)


def test_flops_from_exact_visible_pairs():
    full = describe(_case())
    assert full["visible_pairs"] == 64 * 64
    assert full["flops"] == 4 * 2 * 4 * 64 * 64 * 32
    causal = describe(_case(mask="causal", mask_name="causal"))
    assert causal["visible_pairs"] == 64 * 65 // 2
    assert causal["flops"] == 4 * 2 * 4 * (64 * 65 // 2) * 32
    cross = describe(_case(mask="causal", mask_name="causal", seq_q=16, seq_kv=64))
    assert cross["visible_pairs"] == sum(range(64 - 16 + 1, 65))  # bottom-right aligned
    assert cross["pattern"] == "causal_cross"
    for mode, factor in (("bwd", 2.5), ("fwd_bwd", 3.5), ("decode", 1.0)):
        assert case_flops(_case(mode=mode), 100) == factor * case_flops(_case(), 100)


def test_bytes_moved_counts_each_tensor_once():
    case = _case()
    q = 2 * 4 * 64 * 32 * 2
    kv = 2 * 2 * 64 * 32 * 2
    assert case_bytes(case) == 2 * q + 2 * kv
    assert case_bytes(_case(mode="fwd_bwd")) == 6 * q + 6 * kv


def test_a_decode_step_reads_only_the_keys_its_mask_shows():
    def decode(mask):
        return _case(mode="decode", mask=mask, mask_name=mask.split("(")[0], seq_q=1, seq_kv=64)

    q = 2 * 4 * 1 * 32 * 2
    per_key = 2 * 2 * 32 * 2
    assert describe(decode("causal"))["bytes_moved"] == 2 * q + 2 * 64 * per_key
    assert describe(decode("sliding_window(left=9)"))["bytes_moved"] == 2 * q + 2 * 10 * per_key


def test_small_problems_run_first_so_an_interrupted_run_covers_every_mask():
    plan = build_plan(_cfg(methods=["reference"], masks=["causal", "full"], seq_lens=[64, 16, 32]))
    sizes = [c.seq_q * c.seq_kv for c in plan.runnable]
    assert sizes == sorted(sizes)
    first_two = {c.mask for c in plan.runnable[:2]}
    assert first_two == {"causal", "full"}


def test_declaring_decode_is_enough_for_decode_cases_without_declaring_cross():
    from attnbench.methods import METHODS, Capabilities, register_method

    if "t_decode_only" not in METHODS:
        register_method("t_decode_only", Capabilities(masks={"causal"}, decode=True, cross=False))(
            lambda ctx: (lambda q, k, v: q))
    plan = build_plan(_cfg(methods=["t_decode_only"], masks=["causal"], seq_lens=[64],
                           cross_lens=[[16, 64]], modes=["fwd", "decode"]))
    runnable = {(c.mode, c.seq_q) for c in plan.runnable}
    refused = {(c.mode, c.seq_q): reason for c, reason in plan.unsupported}
    assert ("decode", 1) in runnable  # one query against the 64-token cache
    assert refused[("fwd", 16)] == "no cross attention (seq_q != seq_kv)"  # plain cross still needs cross=True
