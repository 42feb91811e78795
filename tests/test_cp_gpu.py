"""CP on GPUs: the CUDA chunk kernels (flash, cuDNN, efficient: PyTorch's private SDPA ops with the
log-sum-exp; FlexAttention with a tile mask) against the float32 math kernel, forward and the backward that
takes the global log-sum-exp; and every layout on a 2-GPU NCCL gang. Marked gpu: skipped without CUDA."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from attnbench import masks
from attnbench.config.plan import Case
from attnbench.cp import shard, tiles
from attnbench.cp.kernels import MathKernel, make_kernel
from attnbench.cp.layouts import _accumulators, attend, attend_backward

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@cuda
@pytest.mark.parametrize("method", ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex"])
@pytest.mark.parametrize("label", ["full", "causal", "document(lengths=[300,500,224])"])
def test_cuda_kernels_merge_like_the_math_kernel(method, label):
    """q shard of a zigzag split against both kv shards, merged; then the backward with the global stats."""
    device = torch.device("cuda")
    seq, heads, heads_kv, dim = 1024, 4, 2, 64
    bound = masks.make_mask(label).bind(seq)
    shards = shard.make_shards("zigzag", seq, 2)
    kernel = make_kernel(method, device, {"flex_block_size": 128})
    math_kernel = MathKernel(device)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, shards[0].length, dim, generator=gen, device=device).to(torch.bfloat16)
    kv = [(torch.randn(1, heads_kv, s.length, dim, generator=gen, device=device).to(torch.bfloat16),
           torch.randn(1, heads_kv, s.length, dim, generator=gen, device=device).to(torch.bfloat16)) for s in shards]
    dout = torch.randn_like(q)
    scale = 1 / math.sqrt(dim)
    results = {}
    for name, kern in (("fast", kernel), ("math", math_kernel)):
        try:
            plans = [tiles.plan_tile(bound, shards[0], s, kern.any_mask) for s in shards]
        except tiles.TileUnsupported:
            assert not kern.any_mask and label.startswith("document")
            pytest.skip(f"{method} runs full and causal tiles only")
        for plan in plans:
            for call in plan.calls:
                kern.prepare(call, bound)
        acc_out, acc_lse = _accumulators(q)
        rests = {}
        for i, (plan, (k, v)) in enumerate(zip(plans, kv)):
            attend(kern, plan, q, k, v, scale, acc_out, acc_lse, rests, i)
        out = acc_out.to(q.dtype)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=device)
        grads = []
        for i, (plan, (k, v)) in enumerate(zip(plans, kv)):
            dk = torch.zeros(k.shape, dtype=torch.float32, device=device)
            dv = torch.zeros_like(dk)
            attend_backward(kern, plan, q, k, v, out, acc_lse, dout, scale, rests, i, dq, dk, dv)
            grads += [dk, dv]
        results[name] = (out, acc_lse, dq, *grads)
    fast, ref = results["fast"], results["math"]
    finite = torch.isfinite(ref[1])
    assert torch.allclose(fast[1][finite], ref[1][finite], atol=2e-2)
    for got, want in zip(fast[:1] + fast[2:], ref[:1] + ref[2:]):
        assert _rel(got, want) < 2e-2


@two_gpus
def test_every_layout_on_two_gpus(tmp_path):
    from attnbench.cp.gang import Gang
    from attnbench.execute.runner import worker_options

    options = worker_options({"timing": {"budget_ms": 5, "warmup_ms": 0, "min_reps": 2, "max_reps": 3}})
    layouts = ["ring(balance=zigzag)", "ring_allgather(balance=zigzag)", "ulysses(balance=zigzag)",
               "usp(balance=zigzag,ulysses=2)", "torch_cp(balance=zigzag)", "torch_cp"]
    cases = []
    for layout in layouts:
        for mask in ("causal",) if "zigzag" in layout else ("full", "causal"):
            for method in ("sdpa_cudnn", "sdpa_flash") + (("flex",) if "torch_cp" not in layout else ()):
                cases.append(Case(method=method, mask=mask, mask_name=mask, batch=1, heads_q=8, heads_kv=8,
                                  seq_q=4096, seq_kv=4096, head_dim=128, dtype="bfloat16", mode="fwd_bwd",
                                  layout=layout, world_size=2))
    gang = Gang(2, ["cuda:0", "cuda:1"], options, [], tmp_path)
    gang.start()
    rows = []
    try:
        for case in cases:
            rows.append(gang.run(case, "gpu", 300))
    finally:
        gang.stop()
    bad = [(c.layout, c.method, c.mask, r["status"], r.get("reason")) for c, r in zip(cases, rows) if r["status"] != "ok"]
    assert not bad, bad
