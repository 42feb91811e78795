"""Breadth methods of issue 10 (Aaren, InfSA, Nystromformer, ABC, tensor attention, LLA, S4D, MetaMixer,
LaMamba, NAtS-L): harness rows, forms agree, causality of the layers, limits, negative controls."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from attnbench.execute.runner import run_sweep
from attnbench.methods.hybrid import layers, nats_l
from attnbench.methods.linear import aaren, common, lla, nystrom, s4d, tensor_attn

from test_linear_methods import _build, _close, _grads, _rand

BREADTH = ["aaren", "infsa", "linear_infsa", "nystromformer", "abc", "tensor_attn", "lla", "s4d", "metamixer",
           "lamamba", "nats_l"]
LAYERS = ["aaren", "s4d", "metamixer", "lamamba", "nats_l"]
SMALL = {"nystromformer": {"landmarks": 4}, "abc": {"slots": 4, "chunk": 4}, "nats_l": {"block": 4},
         "lamamba": {"window": 4, "chunk": 4, "state_size": 4}, "aaren": {"chunk": 4}, "s4d": {"state_size": 4},
         "metamixer": {"k1": 3, "k2": 5}, "tensor_attn": {"block": 3}, "infsa": {"block": 5}}


def test_harness_rows(cfg):
    cfg.update(methods=BREADTH, masks=["full", "causal"], seq_lens=[16], modes=["fwd_bwd", "decode"], heads_q=2,
               head_dim=8, method_options=SMALL)
    frame = pd.read_parquet(run_sweep(cfg, "test", show_progress=False) / "rows.parquet")
    ok = {(r.method, r["mask"], r["mode"]) for _, r in frame.iterrows() if r.status == "ok"}
    for method in BREADTH:
        causal = method not in ("infsa", "linear_infsa", "nystromformer")
        assert (method, "causal" if causal else "full", "fwd_bwd") in ok, method
    assert ("abc", "causal", "decode") in ok  # a recurrent decode with a state
    bad = frame[~frame.status.isin(["ok", "unsupported"])]
    assert bad.empty, bad[["method", "mask", "mode", "status", "reason"]].to_string()
    # layers report their own FLOPs; q/k/v rows the attention-equivalent ones
    layer_rows = frame[frame.method.isin(LAYERS) & (frame.status == "ok")]
    assert (layer_rows.flops > 0).all()
    abc = frame[(frame.method == "abc") & (frame["mode"] == "decode") & (frame["mask"] == "causal")].iloc[0]
    assert abc.state_bytes == 2 * (4 * 8 * 2 + 4 + 4) * 4  # [n, d] twice, Σ e and the running max m


@pytest.mark.parametrize("method", LAYERS)
def test_causal_layers_do_not_leak(method):
    prepared = _build(method, "causal", 16, 16, params=SMALL.get(method))
    x = _rand(1, 16, 16, seed=1)
    x2 = x.clone()
    x2[:, 9:] = _rand(1, 7, 16, seed=2) * 3
    for form in (prepared.fn, prepared.reference):
        assert torch.allclose(form(x)[:, :9], form(x2)[:, :9], atol=1e-6)
        assert not torch.allclose(form(x)[:, 9:], form(x2)[:, 9:], atol=1e-3)


@pytest.mark.parametrize("method", LAYERS)
def test_layer_forms_agree_with_parameter_gradients(method):
    prepared = _build(method, "causal", 16, 16, params=SMALL.get(method))
    x = _rand(1, 16, 16, seed=3, requires_grad=True)
    targets = [x, *prepared.parameters]
    got = _grads(lambda x_, *_: prepared.fn(x_), *targets)
    want = _grads(lambda x_, *_: prepared.reference(x_), *targets)
    assert _close(got[0], want[0], 1e-5)
    assert all(_close(g, w, 1e-4) for g, w in zip(got[1], want[1]) if w.abs().max() > 0)


def test_aaren_chunked_scan_step_and_loop_agree():
    s, v = _rand(2, 3, 21, seed=1) * 4, _rand(2, 3, 21, 5, seed=2)
    loop = aaren.scan_loop(s, v)
    for chunk in (1, 4, 8, 64):
        assert _close(aaren.scan_chunked(s, v, chunk), loop)
    state = (torch.full((2, 3), float("-inf")), torch.zeros(2, 3), torch.zeros(2, 3, 5))
    for t in range(21):
        state, out = aaren.aaren_step(state, s[:, :, t], v[:, :, t])
    assert _close(out, loop[:, :, -1])
    # exact softmax of the fixed query over each prefix
    assert _close(loop[:, :, 6], (torch.softmax(s[:, :, :7], -1)[..., None] * v[:, :, :7]).sum(2))


def test_nystromformer_is_softmax_with_one_landmark_per_token():
    q, k, v = _rand(1, 2, 8, 4, seed=1) * 0.5, _rand(1, 2, 8, 4, seed=2) * 0.5, _rand(1, 2, 8, 4, seed=3)
    exact = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    assert _close(nystrom.nystrom_fast(q, k, v, 8, 30), exact, 1e-3)
    assert not _close(nystrom.nystrom_fast(q, k, v, 2, 30), exact, 1e-2)  # fewer landmarks: an approximation


def _largest_tensor(fn, *args, **kwargs) -> int:
    """The most elements any op inside ``fn`` returns (run on meta tensors: no memory, any length)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    Largest.most = max(Largest.most, t.numel())
            return out

    with Largest():
        fn(*args, **kwargs)
    return Largest.most


def test_nystromformer_reference_never_builds_a_length_squared_matrix():
    """At 128K tokens the reference holds [L, landmarks] matrices at most, and its ``rows=`` sample matches the
    full output; negative control: the left-to-right product F·A⁺·B builds [L, L] (1 TiB on the H200)."""
    L, m = 131072, 16
    q, k, v = (torch.empty(1, 2, L, 8, device="meta") for _ in range(3))
    assert _largest_tensor(nystrom.nystrom_reference, q, k, v, m, 2) <= 2 * L * m * 2
    left_to_right = lambda q, k, v: (torch.softmax(q @ k[:, :, :m].transpose(-1, -2), -1)  # noqa: E731
                                     @ torch.softmax(q[:, :, :m] @ k.transpose(-1, -2), -1) @ v)
    assert _largest_tensor(left_to_right, q, k, v) >= L * L
    q, k, v = (_rand(1, 2, 40, 4, seed=s) for s in (1, 2, 3))
    rows = torch.tensor([0, 7, 39])
    full = nystrom.nystrom_reference(q, k, v, 5, 6)
    assert _close(nystrom.nystrom_reference(q, k, v, 5, 6, rows=rows), full[:, :, rows], 1e-6)


def test_lla_tends_to_softmax_with_a_large_ridge_and_forms_agree():
    q, k, v = (_rand(1, 2, 10, 4, seed=s, requires_grad=True) for s in (1, 2, 3))
    kw = dict(causal=True, offset=0, scale=0.5, absolute=False)
    soft = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(
        ~common.causal_visible(10, 10, 0, "cpu"), float("-inf")), -1) @ v
    assert _close(lla.lla_fast(q, k, v, lam=1e7, **kw), soft, 1e-5)
    assert not _close(lla.lla_fast(q, k, v, lam=0.1, **kw), soft, 1e-2)
    for absolute in (False, True):
        kw["absolute"] = absolute
        got = _grads(lambda a, b, c: lla.lla_fast(a, b, c, lam=0.5, **kw), q, k, v)
        want = _grads(lambda a, b, c: lla.lla_reference(a, b, c, lam=0.5, **kw), q, k, v)
        assert _close(got[0], want[0], 1e-4) and all(_close(g, w, 1e-3) for g, w in zip(got[1], want[1]))


def test_tensor_attention_blocked_equals_reference_and_catches_a_dropped_mask():
    q, k1, v1, k2, v2 = (_rand(1, 2, 7, 4, seed=s, requires_grad=True) for s in range(5))
    kw = dict(causal=True, offset=0, scale=0.5)
    got = _grads(lambda *a: tensor_attn.tensor_blocked(*a, block=3, **kw), q, k1, v1, k2, v2)
    want = _grads(lambda *a: tensor_attn.tensor_reference(*a, **kw), q, k1, v1, k2, v2)
    assert _close(got[0], want[0]) and all(_close(g, w, 1e-4) for g, w in zip(got[1], want[1]))
    leaky = tensor_attn.tensor_blocked(q, k1, v1, k2, v2, block=3, causal=False, offset=0, scale=0.5)
    assert not _close(leaky, want[0], 1e-2)


def test_cubic_and_direct_solve_methods_refuse_long_cases_with_the_reason():
    from attnbench.methods import Unsupported

    for method in ("tensor_attn", "lla"):
        with pytest.raises(Unsupported, match="max_len"):
            _build(method, "causal", 1024, 1024)


def test_s4d_fft_fft64_and_step_match_the_recurrence():
    params = s4d.init_parameters(3, 4, torch.Generator().manual_seed(0), "cpu")
    ssm = {k: v.detach() for k, v in params.items() if k not in ("d", "w_o")}
    x = _rand(2, 20, 3, seed=1)
    loop = s4d.s4d_loop(x, ssm)
    assert _close(s4d.s4d_fft(x, ssm), loop, 1e-4)
    assert _close(s4d.s4d_fft64(x, ssm), loop, 1e-4)
    state = torch.zeros(2, 3, 2, dtype=torch.complex64)
    for t in range(20):
        state, y = s4d.s4d_step(state, x[:, t], ssm)
    assert _close(y, loop[:, -1], 1e-4)


def test_s4d_kernel_in_blocks_equals_the_one_shot_kernel_values_and_gradients(monkeypatch):
    params = s4d.init_parameters(3, 4, torch.Generator().manual_seed(0), "cpu")
    ssm = {k: v for k, v in params.items() if k not in ("d", "w_o")}
    upstream = _rand(3, 23, seed=3)

    def kernel_and_grads(block):
        K = s4d.s4d_kernel(ssm, 23, block=block)  # 23 = 3 blocks of 8 (the last short) / one block of 64
        return (K,) + torch.autograd.grad((K * upstream).sum(), list(ssm.values()))

    whole, blocks = kernel_and_grads(64), kernel_and_grads(8)
    for a, b in zip(whole, blocks):
        assert _close(b, a, 1e-5)
    original = s4d._kernel_block  # negative control: every block restarts at position 0
    monkeypatch.setattr(s4d, "_kernel_block", lambda dtA, coef, start, stop: original(dtA, coef, 0, stop - start))
    assert not _close(s4d.s4d_kernel(ssm, 23, block=8), whole[0], 1e-3)
    with pytest.raises(ValueError, match="block"):
        s4d.s4d_kernel(ssm, 23, block=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k", [1, 3, 4, 7])
def test_depthwise_conv_forms_agree(causal, k):
    x, w = _rand(2, 9, 5, seed=1), _rand(5, k, seed=2)
    assert _close(layers.dwconv(x, w, causal), layers.dwconv_reference(x, w, causal))


def test_nats_l_routes_both_ways_and_the_skip_rule_matters():
    x = _rand(1, 32, 16, seed=5)
    prepared = _build("nats_l", "causal", 32, 32, params={"block": 4})
    assert _close(prepared.fn(x), prepared.reference(x))
    heads, dim, block = 2, 8, 4
    q, k, v = (_rand(1, heads, 32, dim, seed=s) for s in (1, 2, 3))
    g = F.logsigmoid(_rand(1, heads, 32, seed=4))
    beta = torch.rand(1, heads, 32, generator=torch.Generator().manual_seed(6))
    m_lin = (torch.rand(1, heads, 8, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    assert 0 < float(m_lin.mean()) < 1
    fast = nats_l.gdn_branch_chunked(q, k, v, g, beta, m_lin, block)
    assert _close(fast, nats_l.gdn_branch_loop(q, k, v, g, beta, m_lin, block))
    # negative control: ignoring the routing (every chunk written into the carried state) disagrees
    assert not _close(nats_l.gdn_branch_chunked(q, k, v, g, beta, torch.ones_like(m_lin), block), fast, 1e-3)


@pytest.mark.parametrize("length", [40, 43])  # even segments (a view's mean) and uneven (index_add)
def test_nystrom_segment_means_match_the_averaging_matrix_values_and_gradients(length):
    x = _rand(1, 2, length, 4, seed=5, requires_grad=True)
    want = nystrom.averaging_matrix(length, 8, "cpu") @ x
    got = nystrom.segment_means(x, 8)
    assert _close(got, want, 1e-6)
    weights = _rand(1, 2, 8, 4, seed=6)
    (g_got,) = torch.autograd.grad((got * weights).sum(), x)
    (g_want,) = torch.autograd.grad((want * weights).sum(), x)
    assert _close(g_got, g_want, 1e-6)


def _full_size_backward_tensors(landmark_fn, length=64, segments=16):
    from torch.utils._python_dispatch import TorchDispatchMode

    x = _rand(1, 2, length, 4, seed=7, requires_grad=True)
    out = landmark_fn(x, segments).sum()

    class Count(TorchDispatchMode):
        full = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in (result if isinstance(result, (tuple, list)) else (result,)):
                if isinstance(t, torch.Tensor) and t.numel() == x.numel():
                    Count.full += 1
            return result

    with Count():
        torch.autograd.grad(out, x)
    return Count.full


def test_nystrom_landmarks_backward_writes_a_few_full_size_gradients_not_one_per_segment():
    """The H200's nystromformer fwd_bwd grew with slope 1.45 (128K-1M, results/h200-linear-long): a mean per
    segment wrote one full-size gradient per landmark in its backward. Negative control: that form."""
    per_segment = lambda x, m: torch.stack([s.mean(2) for s in torch.tensor_split(x, m, dim=2)], dim=2)  # noqa: E731
    assert _full_size_backward_tensors(per_segment) >= 16
    assert _full_size_backward_tensors(nystrom.segment_means) <= 3
    assert _full_size_backward_tensors(nystrom.segment_means, length=67) <= 3


@pytest.mark.parametrize("newest_is_largest", [False, True])
def test_abc_decode_step_reads_the_newest_scores_only_and_matches_the_reference(newest_is_largest):
    """abc's step keeps a running per-slot maximum (O(1) a step; it shifted by the maximum over every score, an
    O(L) pass each step). It equals the reference's last row, also when the newest score raises the maximum
    (the sums rescaled), and it does not read the older scores; negative control: changing the newest does."""
    seq, slots = 11, 4
    prepared = _build("abc", "causal", seq, seq, params={"slots": slots, "chunk": 4})
    q, k, v = _rand(1, 2, seq, 8, seed=1), _rand(1, 2, seq, 8, seed=2), _rand(1, 2, seq, 8, seed=3)
    s = _rand(1, 2, seq, slots, seed=4)
    if newest_is_largest:
        s[:, :, -1] += 5.0
    full = prepared.reference(q, k, v, s=s)
    state = prepared.decode.prefill(q[:, :, -1:], k, v, s=s)
    step = prepared.decode.step(state, q[:, :, -1:], k, v, s=s)
    assert _close(step, full[:, :, -1:])
    older = s.clone()
    older[:, :, :-1] = _rand(1, 2, seq - 1, slots, seed=5) * 9
    assert torch.equal(prepared.decode.step(state, q[:, :, -1:], k, v, s=older), step)
    newest = s.clone()
    newest[:, :, -1] += 1.0
    assert not _close(prepared.decode.step(state, q[:, :, -1:], k, v, s=newest), step, 1e-4)
