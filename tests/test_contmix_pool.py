"""contmix1d's region keys without ``F.adaptive_avg_pool*d`` (its CUDA backward fails an internal assert at long
lengths: H200, contmix1d full fwd_bwd at 16K, "AdaptiveAveragePooling.cu:708"): ``RegionMean`` gives the
adaptive-pooling result (values and gradients) for lengths that divide into the regions (reshape + mean) and
lengths that do not (overlapping edge tokens, averaging matrix), in 1-D and 2-D; the layer's fast path no
longer calls adaptive pooling."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attnbench import masks
from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared
from attnbench.methods.analysis import contmix


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("length, regions", [(98, 49), (100, 49), (37, 7), (49, 49), (50, 1)])
def test_region_mean_is_adaptive_average_pooling_in_1d(length, regions):
    pool = contmix.RegionMean(length, regions)
    assert (pool.matrix is None) == (length % regions == 0)  # both forms exercised by the parameters
    x = _rand(2, length, 6).requires_grad_()
    got = pool(x, 1)
    want = F.adaptive_avg_pool1d(x.transpose(1, 2), regions).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = _rand(*got.shape, seed=1)
    (g_got,) = torch.autograd.grad(got, x, grad)
    (g_want,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("height, width, side", [(12, 9, 3), (10, 7, 3), (6, 6, 6)])
def test_region_mean_is_adaptive_average_pooling_in_2d(height, width, side):
    rows, cols = contmix.RegionMean(height, side), contmix.RegionMean(width, side)
    x = _rand(2, height, width, 5).requires_grad_()
    got = cols(rows(x, 1), 2).reshape(2, side * side, 5)
    want = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), side).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = _rand(*got.shape, seed=2)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
                               rtol=1e-12, atol=1e-12)


def test_region_mean_negative_control():
    """A plain reshape of a length the regions do not divide (dropping the tail) is not adaptive pooling: the
    comparison above can tell them apart."""
    x = _rand(1, 100, 3)
    dropped = x[:, :98].reshape(1, 49, 2, 3).mean(2)
    want = F.adaptive_avg_pool1d(x.transpose(1, 2), 49).transpose(1, 2)
    assert not torch.allclose(dropped, want, rtol=1e-6, atol=1e-6)


def _ctx(mask, seq, options=None, params=None):
    bound = masks.make_mask(mask).bind(seq, seq)
    case = SimpleNamespace(method="contmix1d", batch=1, heads_q=2, heads_kv=2, seq_q=seq, seq_kv=seq, head_dim=8,
                           seed=0, dtype="float32")
    return BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                        dtype=torch.float32, options=dict(options or {}), params=dict(params or {}))


@pytest.mark.parametrize("seq, options, params", [
    (100, {}, {"regions": 49}),  # 49 regions do not divide 100
    (98, {}, {"regions": 49}),
    (70, {"grid": (10, 7)}, {"regions": 9, "kernel_small": 3, "kernel_large": 5}),
])
def test_contmix_fast_path_runs_without_adaptive_pooling_and_matches_its_reference(monkeypatch, seq, options,
                                                                                     params):
    def refuse(*args, **kwargs):
        raise AssertionError("adaptive pooling called (its CUDA backward fails at long lengths)")

    monkeypatch.setattr(F, "adaptive_avg_pool1d", refuse)
    monkeypatch.setattr(F, "adaptive_avg_pool2d", refuse)
    prepared = as_prepared(METHODS["contmix1d"].build(_ctx("full", seq, options, params)))
    x = _rand(2, seq, 16, seed=3).float().requires_grad_()
    out = prepared.fn(x)
    want = prepared.reference(x.detach().double())
    assert float((out.detach().double() - want).norm() / want.norm()) < 1e-5
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
