"""GPU checks of the routed/sparse/local methods' fast paths (compiled FlexAttention, cuDNN/flash tiles): every
method against its own reference in bf16 through the case runner, and the data-dependent BlockMask path
(Superlinear) called again on new inputs without a recompilation. Run with ``pytest -m gpu``."""
from __future__ import annotations

import pytest
import torch

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.execute.case import CaseRunner
from attnbench.methods import METHODS, BuildContext, MaskInfo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TIMING = {"budget_ms": 2, "warmup_ms": 0, "min_reps": 1, "max_reps": 2, "flush_l2": False, "telemetry": False}
OPTIONS = {"biformer": {"region": 128, "topk": 3}, "biformer_2d": {"regions_per_side": 4, "topk": 4},
           "biformer_layer": {"regions_per_side": 4, "topk": 4}, "halo": {"block": 128, "halo": 64},
           "halo_2d": {"block": 8, "halo": 3}, "long_short": {"window": 128, "rank": 32}}
CASES = [(name, mask) for name in ("biformer", "biformer_2d", "biformer_layer", "halo", "halo_2d", "routing",
                                   "combiner_fixed", "combiner_axial", "combiner_logsparse", "sparsifiner",
                                   "probsparse", "long_short", "superlinear")
         for mask in ("full", "causal") if mask in METHODS[name].caps.masks]


def run_case(method, mask, mode, seq=1024, options=None):
    spec = masks.make_mask(mask)
    runner = CaseRunner("cuda:0", {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32,
                                   "method_options": {**OPTIONS, **(options or {})}})
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=4, heads_kv=4, seq_q=seq,
                seq_kv=seq, head_dim=64, dtype="bfloat16", mode=mode, device="cuda:0")
    return runner.run(case)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("method, mask", CASES)
def test_fast_path_matches_its_reference_on_the_gpu(method, mask, mode):
    row = run_case(method, mask, mode)
    assert row["status"] == "ok", row["reason"]


def test_superlinear_block_masks_change_per_call_without_recompiling():
    import torch._dynamo

    spec = masks.make_mask("causal")
    bound = spec.bind(2048, 2048).to("cuda:0")
    case = Case(method="superlinear", mask=spec.label, mask_name=spec.name, batch=1, heads_q=4, heads_kv=4,
                seq_q=2048, seq_kv=2048, head_dim=64, dtype="bfloat16", mode="fwd", device="cuda:0")
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cuda:0"),
                       dtype=torch.bfloat16, options={}, params={})
    prepared = METHODS["superlinear"].build(ctx)

    def draw(seed):
        gen = torch.Generator(device="cuda:0").manual_seed(seed)
        return [torch.randn(1, 4, 2048, 64, generator=gen, device="cuda:0", dtype=torch.bfloat16) for _ in range(4)]

    q, k, v, q1 = draw(0)
    first = prepared.fn(q, k, v, q1=q1)
    q, k, v, q1 = draw(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = prepared.fn(q, k, v, q1=q1)
    assert torch.isfinite(second).all() and not torch.equal(first, second)


IMPL_CASES = [("halo", impl, mask) for impl in ("strided", "strided_square", "gather", "flex")
              for mask in ("full", "causal")] + [("long_short", impl, mask) for impl in ("strided", "flex")
                                                  for mask in ("full", "causal")] + [
    (name, impl, mask) for name in ("combiner_fixed", "combiner_axial") for impl in ("sdpa", "flex")
    for mask in ("full", "causal")] + [("biformer", impl, mask) for impl in ("gather", "flex")
                                      for mask in ("full", "causal")]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("method, impl, mask", IMPL_CASES)
def test_each_impl_matches_its_reference_on_the_gpu(method, impl, mask, mode):
    row = run_case(method, mask, mode, options={method: {**OPTIONS.get(method, {}), "impl": impl}})
    assert row["status"] == "ok", row["reason"]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_biformer_flex_with_two_blocks_per_region(mode):
    """impl flex, causal, region 256 (two 128-blocks per region: a full block beside the diagonal one)."""
    row = run_case("biformer", "causal", mode, options={"biformer": {"region": 256, "topk": 2, "impl": "flex"}})
    assert row["status"] == "ok", row["reason"]


def test_biformer_flex_block_masks_change_per_call_without_recompiling():
    import torch._dynamo

    spec = masks.make_mask("causal")
    bound = spec.bind(2048, 2048).to("cuda:0")
    case = Case(method="biformer", mask=spec.label, mask_name=spec.name, batch=1, heads_q=4, heads_kv=4,
                seq_q=2048, seq_kv=2048, head_dim=64, dtype="bfloat16", mode="fwd", device="cuda:0")
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cuda:0"),
                       dtype=torch.bfloat16, options={}, params={"region": 256, "topk": 3, "impl": "flex"})
    prepared = METHODS["biformer"].build(ctx)

    def draw(seed):
        gen = torch.Generator(device="cuda:0").manual_seed(seed)
        return [torch.randn(1, 4, 2048, 64, generator=gen, device="cuda:0", dtype=torch.bfloat16) for _ in range(3)]

    first = prepared.fn(*draw(0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = prepared.fn(*draw(1))
    assert torch.isfinite(second).all() and not torch.equal(first, second)


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
@pytest.mark.parametrize("causal", [None, "square", "lower_right"])
def test_strided_windows_on_each_sdpa_backend(backend, causal):
    """Overlapping window views (no copy) through one SDPA backend equal the same windows copied, forward
    and gradients; a backend that refuses the strides fails here with its own message."""
    from attnbench.methods.sparse import common

    if causal == "lower_right" and backend == "cudnn":
        pytest.skip("PyTorch gives cuDNN no bottom-right causal")
    gen = torch.Generator(device="cuda:0").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4096, 128, generator=gen, device="cuda:0", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    count, width, step = 15, 512 if causal != "lower_right" else 384, 256
    qw = (common.overlapping_windows(q, 0, count, width, step) if causal == "square"
          else q.reshape(4, 4096, 128)[:, 256:256 + count * 256].unflatten(1, (count, 256)))
    kw, vw = (common.overlapping_windows(t, 0, count, width, step) for t in (k, v))
    out = common.sdpa_windows(qw, kw, vw, causal, backend)
    want = common.sdpa_windows(*(t.contiguous() for t in (qw, kw, vw)), causal, backend)
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    wants = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


# ---- superlinear: search auto, query chunks (checkpointed) and the memory the CPU replay projects ---------------
def _superlinear(seq, params, heads=4, dim=64, mode="fwd_bwd"):
    spec = masks.make_mask("causal")
    bound = spec.bind(seq, seq).to("cuda:0")
    case = Case(method="superlinear", mask=spec.label, mask_name=spec.name, batch=1, heads_q=heads, heads_kv=heads,
                seq_q=seq, seq_kv=seq, head_dim=dim, dtype="bfloat16", mode=mode, device="cuda:0")
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cuda:0"),
                       dtype=torch.bfloat16, options={}, params=dict(params))
    return METHODS["superlinear"].build(ctx)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd", "bwd"])
def test_superlinear_query_chunks_are_gated_ok(mode):
    """2048 tokens in chunks of 768 rows (768, 768, 512: two compiled shapes), checkpointed with gradients; bwd
    replays one held graph through the checkpoints."""
    row = run_case("superlinear", "causal", mode, seq=2048, options={"superlinear": {"query_chunk": 768}})
    assert row["status"] == "ok", row["reason"]


def _superlinear_variants_agree(variants: list[dict], seed: int, resolved=None):
    """Values and gradients of each variant's superlinear (2048 tokens, bf16) against the first's (both round the
    same FlexAttention outputs; the gates' dk is summed in fp32 by both), and a second fwd_bwd call of each (new
    inputs: new routing, the checkpoints' recompute included) without a recompilation. ``resolved(params)``:
    what ``fn.resolved`` must hold for a variant."""
    import torch._dynamo

    seq = 2048
    gen = torch.Generator(device="cuda:0").manual_seed(seed)
    inputs = [torch.randn(1, 4, seq, 64, generator=gen, device="cuda:0", dtype=torch.bfloat16) for _ in range(5)]
    results = []
    for params in variants:
        prepared = _superlinear(seq, params)
        if resolved is not None:
            assert prepared.fn.resolved == resolved(params)
        leaves = [t.clone().requires_grad_() for t in inputs[:4]]
        out = prepared.fn(*leaves[:3], q1=leaves[3])
        results.append((out, *torch.autograd.grad(out, leaves, inputs[4])))
        again = [t.flip(2).clone().requires_grad_() for t in inputs[:4]]
        with torch._dynamo.config.patch(error_on_recompile=True):
            out2 = prepared.fn(*again[:3], q1=again[3])
            torch.autograd.grad(out2, again, inputs[4])
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_superlinear_chunks_equal_the_whole_sequence_and_do_not_recompile():
    """The chunked form against the whole-sequence form, no recompilation, and search auto resolved to the
    kernel."""
    _superlinear_variants_agree([{"query_chunk": 2048}, {"query_chunk": 512}], seed=0, resolved=lambda p: {
        "search": "triton", "query_chunk": p["query_chunk"], "query_order": "natural"})


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_superlinear_sorted_query_order_is_gated_ok(mode):
    """query_order: sorted through compiled FlexAttention (a mask_mod reading [B, H, rows] positions), whole and
    in chunks of 768 rows: the harness's gate against the reference."""
    for chunk in (2048, 768):
        row = run_case("superlinear", "causal", mode, seq=2048,
                       options={"superlinear": {"query_order": "sorted", "query_chunk": chunk}})
        assert row["status"] == "ok", row["reason"]


def test_superlinear_sorted_order_equals_natural_and_does_not_recompile():
    """query_order sorted against natural (the same FlexAttention roundings up to the order of the rows), and a
    second call on new inputs (new permutations) without a recompilation."""
    _superlinear_variants_agree([{"query_order": "natural"}, {"query_order": "sorted"}], seed=1)


def test_superlinear_peak_memory_is_what_the_cpu_replay_projects():
    """tests/test_superlinear_memory.py projects the 1M peak from a replay on the CPU; here the same replay at
    64K's ratios (16 heads, d 128, bf16, 3 spans, 8 chunks of 8K rows: ``L / b^2`` = 4 block entries per query,
    the gates in 6 steps) against the allocator's peak of a fwd_bwd call above its inputs on the device. The
    CUDA sorts' own scratch is not in the replay (~12 B a sorted entry: 16 x 64 x 512 entries a chunk here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_superlinear_memory as replayed

    seq, heads, dim = 65536, 16, 128
    small = 256
    with pytest.MonkeyPatch.context() as mp:
        per = replayed.replay(mp, small, heads, dim, torch.bfloat16, {"query_chunk": small // 8}, 8,
                              round(small * 10922 / seq))
    expect = per["fwd_bwd"] * heads * seq
    prepared = _superlinear(seq, {"query_chunk": seq // 8}, heads=heads, dim=dim)
    gen = torch.Generator(device="cuda:0").manual_seed(0)
    q, k, v, q1, dout = (torch.randn(1, heads, seq, dim, generator=gen, device="cuda:0", dtype=torch.bfloat16)
                         for _ in range(5))
    leaves = [t.requires_grad_() for t in (q, k, v, q1)]
    for _ in range(2):  # the first call compiles
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = prepared.fn(q, k, v, q1=q1)
        grads = torch.autograd.grad(out, leaves, dout)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        del out, grads
    assert abs(measured - expect) < 0.15 * expect, (measured / 2**20, expect / 2**20)


# ---- probsparse: the measurement kernel -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_probsparse_measure_triton_is_gated_ok(mode):
    row = run_case("probsparse", "full", mode, seq=4096, options={"probsparse": {"measure": "triton"}})
    assert row["status"] == "ok", row["reason"]


def test_probsparse_measure_kernel_equals_torch_on_the_gpu():
    """bf16 inputs at 16 heads, d 128, 8K queries and keys, 5 * ceil(ln 8192) samples: the kernel's measurement
    against the PyTorch one (fp32 from the same widened values; summation orders differ), and the same top-u."""
    from attnbench.methods.sparse import probsparse, probsparse_triton

    gen = torch.Generator(device="cuda:0").manual_seed(0)
    q, k = (torch.randn(1, 16, 8192, 128, generator=gen, device="cuda:0", dtype=torch.bfloat16) for _ in range(2))
    samples = torch.randint(8192, (8192, 45), generator=gen, device="cuda:0")
    got, want = probsparse_triton.measure(q, k, samples), probsparse.measurements(q, k, samples)
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert torch.equal(got.topk(45, -1).indices.sort(-1).values, want.topk(45, -1).indices.sort(-1).values)
