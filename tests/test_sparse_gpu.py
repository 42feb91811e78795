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
