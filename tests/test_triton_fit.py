"""The own Triton kernels fit an H200's shared memory at the widths their methods declare (256: cosFormer's
2d-wide features through ``impl: triton``, ``linear_attn_triton`` / ``simple_gla_triton``'s ``max_head_dim``),
compiled offline for sm_90 by methods/triton_fit.py (no GPU). The negative control is the configuration that
failed on the H200 (3 pipeline stages at 256-wide tiles: ``OutOfResources ... Required: 253952, Hardware
limit: 232448``, results/h200-linear-kernelized-triton): the same check flags it."""
import os

import pytest
import torch

from attnbench.methods.triton_fit import SM90, compile_fits, record_launches

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on"):
    pytest.skip("interpreter process: kernels are interpreted, not compiled", allow_module_level=True)


def _inputs(width_qk, width_v, seq=1024, heads=2):
    torch.manual_seed(0)
    q, k = (torch.randn(1, heads, seq, width_qk, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, heads, seq, width_v, dtype=torch.bfloat16, requires_grad=True)
    return q, k, v


def _linear_attn_launches(feature_map, width_qk, width_v):
    from attnbench.methods.linear.linear_triton import linear_attn

    q, k, v = _inputs(width_qk, width_v)
    with record_launches() as launches:  # seq 1024 = 16 chunks = 4 segments: the state kernels and carried states
        linear_attn(q, k, v, feature_map=feature_map).sum().backward()
    assert len(launches) >= 6, f"expected the forward's and the backward's launches, recorded {len(launches)}"
    return launches


@pytest.mark.parametrize("feature_map, width_qk, width_v", [
    ("identity", 256, 128),     # cosFormer, head dim 128: 2d = 256 features (the H200's OutOfResources)
    ("precomputed", 256, 256),  # linear_attn_triton at its max_head_dim
])
def test_linear_scan_fits_h200_shared_memory(feature_map, width_qk, width_v):
    fits = compile_fits(_linear_attn_launches(feature_map, width_qk, width_v))
    too_big = [f for f in fits if not f.ok]
    assert not too_big, too_big
    assert any(f.constexprs.get("BK") == 256 for f in fits), "no 256-wide scan was compiled"


def test_negative_control_three_stages_at_256_do_not_fit():
    fits = compile_fits(_linear_attn_launches("identity", 256, 128), num_stages=3)
    worst = max(fits, key=lambda f: f.shared)
    assert not worst.ok and worst.shared > SM90["shared_limit"], worst


def test_gated_scan_fits_h200_shared_memory():
    from attnbench.methods.linear.gla_triton import simple_gla

    q, k, v = _inputs(256, 256)
    g = torch.nn.functional.logsigmoid(torch.randn(1, 2, 1024)).requires_grad_()
    with record_launches() as launches:
        simple_gla(q, k, v, g).sum().backward()
    fits = compile_fits(launches)
    assert len(fits) >= 3 and all(f.ok for f in fits), fits


def test_record_launches_restores_the_launcher():
    from triton.runtime.jit import JITFunction

    before = JITFunction.run
    with pytest.raises(RuntimeError):
        with record_launches():
            assert JITFunction.run is not before
            raise RuntimeError("leave the block early")
    assert JITFunction.run is before


def _delta_launches(dk, **opts):
    from attnbench.methods.linear.delta_triton import chunk_states

    torch.manual_seed(0)
    shape = (1, 2, 8, 64)  # 8 chunks of 64 tokens
    U = torch.randn(*shape, 128, requires_grad=True)
    W, kd = (torch.randn(*shape, dk, requires_grad=True) for _ in range(2))
    last = torch.rand(1, 2, 8, requires_grad=True)
    state0 = torch.zeros(1, 2, dk, 128, requires_grad=True)
    with record_launches() as launches:
        states, final = chunk_states(U, W, kd, last, state0, **opts)
        (states.sum() + final.sum()).backward()
    assert [launch.name for launch in launches] == ["_fwd_src", "_bwd_src"], launches
    return launches


@pytest.mark.parametrize("dk", [128, 256])
def test_delta_state_kernels_fit_h200_shared_memory_at_their_defaults(dk):
    fits = compile_fits(_delta_launches(dk))
    assert len(fits) == 2 and all(f.ok for f in fits), fits


def test_negative_control_delta_kernels_at_block_v_64_and_3_stages_do_not_fit():
    fits = compile_fits(_delta_launches(128, block_v=64, num_stages=3))
    assert any(not f.ok for f in fits), fits
