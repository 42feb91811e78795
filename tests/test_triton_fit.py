"""The own Triton kernels fit an H200's shared memory at the widths their methods declare (256: cosFormer's
2d-wide features through ``impl: triton``, ``linear_attn_triton`` / ``simple_gla_triton``'s ``max_head_dim``),
compiled offline for sm_90 by methods/triton_fit.py (no GPU): every method that runs own Triton kernels, built as
a sweep builds it at its default options, forward and backward (``OWN_TRITON``). The negative control is the configuration that
failed on the H200 (3 pipeline stages at 256-wide tiles: ``OutOfResources ... Required: 253952, Hardware
limit: 232448``, results/h200-linear-kernelized-triton): the same check flags it."""
import os
from types import SimpleNamespace

import pytest
import torch

from attnbench.methods.triton_fit import SM90, compile_fits, compile_launch, record_launches

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on"):
    pytest.skip("interpreter process: kernels are interpreted, not compiled", allow_module_level=True)


def _inputs(width_qk, width_v, seq=1024, heads=2):
    torch.manual_seed(0)
    q, k = (torch.randn(1, heads, seq, width_qk, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, heads, seq, width_v, dtype=torch.bfloat16, requires_grad=True)
    return q, k, v


def _linear_attn_launches(feature_map, width_qk, width_v):  # for the negative control
    from attnbench.methods.linear.linear_triton import linear_attn

    q, k, v = _inputs(width_qk, width_v)
    with record_launches() as launches:  # seq 1024 = 16 chunks = 4 segments: the state kernels and carried states
        linear_attn(q, k, v, feature_map=feature_map).sum().backward()
    assert len(launches) >= 6, f"expected the forward's and the backward's launches, recorded {len(launches)}"
    return launches


def test_negative_control_three_stages_at_256_do_not_fit():
    fits = compile_fits(_linear_attn_launches("identity", 256, 128), num_stages=3)
    worst = max(fits, key=lambda f: f.shared)
    assert not worst.ok and worst.shared > SM90["shared_limit"], worst


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


def test_negative_control_delta_kernels_at_block_v_64_and_3_stages_do_not_fit():
    fits = compile_fits(_delta_launches(128, block_v=64, num_stages=3))
    assert any(not f.ok for f in fits), fits


# dot_precision bf16 at the defaults (dk = dv = 128, chunk 64, block_v 32, 4 warps, 2 stages), measured here:
# forward 88 KB shared, 0 spilled, 255 registers; backward 124 KB, ~1.1 KB spilled per thread (tf32's default
# backward spills ~1.4 KB: it holds S_c, dS, dnew and the W / kd tiles, and bf16 adds the operand copies of S_c,
# dS and dnew). So: the forward must not spill, the backward may spill no more than tf32's does today
# (BWD_SPILL_LIMIT), both within the H200's shared memory.
BWD_SPILL_LIMIT = 1536


def test_delta_kernels_bf16_fit_at_their_defaults():
    from attnbench.methods.triton_fit import ptxas_usage

    fwd, bwd = (compile_launch(launch) for launch in _delta_launches(128, dot_precision="bf16"))
    assert ptxas_usage(fwd)[:2] == (0, 0), ptxas_usage(fwd)
    stores, loads, _ = ptxas_usage(bwd)
    assert stores <= BWD_SPILL_LIMIT and loads <= BWD_SPILL_LIMIT, (stores, loads)
    for kernel in (fwd, bwd):
        assert kernel.metadata.shared <= SM90["shared_limit"], kernel.metadata.shared


def test_negative_control_delta_forward_bf16_at_block_v_64_spills():
    """The same spill check flags the bf16 forward at block_v 64 (~140 bytes per thread when measured)."""
    from attnbench.methods.triton_fit import ptxas_usage

    fwd = compile_launch(_delta_launches(128, dot_precision="bf16", block_v=64)[0])
    stores, loads, _ = ptxas_usage(fwd)
    assert stores > 0 and loads > 0, (stores, loads)


def _delta_output_launch(**opts):
    """The forward kernel with the outputs (delta_triton.chunk_forward, outputs: triton) at dk = dv = 128, chunk 64."""
    from attnbench.methods.linear.delta_triton import chunk_forward

    torch.manual_seed(0)
    shape = (1, 2, 8, 64)
    U = torch.randn(*shape, 128, requires_grad=True)
    W, kd, qg = (torch.randn(*shape, 128, requires_grad=True) for _ in range(3))
    attn = torch.randn(*shape, 64, requires_grad=True)
    last = torch.rand(1, 2, 8, requires_grad=True)
    state0 = torch.zeros(1, 2, 128, 128, requires_grad=True)
    with record_launches() as launches:
        chunk_forward(qg, attn, U, W, kd, last, state0, **opts)
    assert [launch.name for launch in launches] == ["_fwd_src"], launches
    return compile_launch(launches[0])


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_delta_forward_with_outputs_fits_at_its_defaults(precision):
    """outputs: triton's forward kernel at its launch defaults (OUTPUT_DEFAULTS: 8 warps, 1 stage; block_v 32):
    no spills, within the H200's shared memory (measured: tf32 56 KB, bf16 44 KB, 0 spilled, 255 registers)."""
    from attnbench.methods.triton_fit import ptxas_usage

    kernel = _delta_output_launch(dot_precision=precision)
    stores, loads, registers = ptxas_usage(kernel)
    assert stores == loads == 0 and registers <= 255, (stores, loads, registers)
    assert kernel.metadata.shared <= SM90["shared_limit"], kernel.metadata.shared


def test_negative_control_delta_forward_with_outputs_at_the_loops_launch_settings():
    """The same checks flag the loop kernel's own settings for it: 2 stages need ~264 KB of shared memory, and
    1 stage at 4 warps spills (~0.46 KB per thread when measured)."""
    from attnbench.methods.triton_fit import ptxas_usage

    assert _delta_output_launch(fwd_num_warps=4, fwd_num_stages=2).metadata.shared > SM90["shared_limit"]
    stores, loads, _ = ptxas_usage(_delta_output_launch(fwd_num_warps=4, fwd_num_stages=1))
    assert stores > 0 and loads > 0, (stores, loads)


# Every method that runs own Triton kernels, built as a sweep builds it (default options; the widest head dim
# its capabilities allow, up to 256, and 128 where no committed H200 row has run it yet), forward and backward,
# bf16: each launch must fit an H200. A new Triton method or option belongs in this list.
OWN_TRITON = [
    ("linear_attn_triton", {}, (256,)),  # 128: results/h200-linear-triton-v3
    ("simple_gla_triton", {}, (256,)),  # 128: results/h200-linear-triton-v3
    ("linear_attn", {"impl": "triton"}, (256,)),
    ("performer", {"impl": "triton", "features": 256}, (128,)),
    ("cosformer", {"impl": "triton"}, (128,)),  # 2d = 256 features
    ("rfa", {"impl": "triton", "features": 128}, (128,)),  # sin and cos: 256 wide
    ("gated_delta_rule", {"impl": "triton"}, (128, 256)),
    ("gated_delta_rule", {"impl": "triton", "dot_precision": "bf16"}, (256,)),  # 128: the test below
    ("delta_rule", {"impl": "triton"}, (128,)),
    ("gated_delta_rule", {"impl": "triton", "outputs": "triton"}, (128,)),  # the forward kernel writes the outputs
    ("delta_rule", {"solve": "triton"}, (128,)),  # tril_triton's inverse (the loop in PyTorch)
    ("gated_delta_rule", {"solve": "triton", "chunk": 128}, (128,)),  # the inverse's largest tile
    ("simple_gla", {"impl": "triton"}, (128,)),
    ("delta_rule", {"solve": "fused"}, (128,)),  # wy_triton's fused pieces (backward: PyTorch, recomputed)
    ("gated_delta_rule", {"solve": "fused", "impl": "triton"}, (128, 256)),
    ("gated_delta_rule", {"solve": "fused", "chunk": 128}, (128,)),  # its largest tiles
    ("simple_gla", {"solve": "fused"}, (128,)),
    ("gated_delta_rule", {"solve": "fused", "wy_backward": "triton", "chunk": 32}, (128, 256)),  # the backward kernel too
    ("delta_rule", {"solve": "fused", "wy_precision": "tf32"}, (128,)),  # the fused kernel's one-product dots
]


def _built_launches(method, params, head_dim, monkeypatch, seq=1024):
    from attnbench import masks
    from attnbench.methods import METHODS, BuildContext, MaskInfo, as_prepared
    from attnbench.methods.linear import linear_attn

    monkeypatch.setattr(linear_attn, "triton_runnable", lambda device: None)  # kernels are recorded, not run
    spec = masks.make_mask("causal")
    bound = spec.bind(seq, seq)
    case = SimpleNamespace(method=method, batch=1, heads_q=2, heads_kv=2, seq_q=seq, seq_kv=seq, head_dim=head_dim,
                           seed=0, dtype="bfloat16", mode="fwd_bwd")
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                       dtype=torch.bfloat16, options={}, params=dict(params))
    prepared = as_prepared(METHODS[method].build(ctx))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, seq, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    generator = torch.Generator().manual_seed(0)
    extras = {name: extra.make(generator, "cpu", torch.bfloat16).requires_grad_(extra.grad)
              for name, extra in (prepared.extras or {}).items()}
    ready = prepared.prepare(q, k, v, **extras) if prepared.prepare else {}  # e.g. Performer's drawn features
    with record_launches() as launches:
        out = prepared.fn(q, k, v, **extras, **ready)
        out.float().sum().backward()
    return launches


@pytest.mark.parametrize("method, params, head_dim",
                         [(m, p, d) for m, p, dims in OWN_TRITON for d in dims])
def test_every_own_triton_method_fits_h200_shared_memory(method, params, head_dim, monkeypatch):
    launches = _built_launches(method, params, head_dim, monkeypatch)
    # solve: triton / fused alone launch their forward kernel only (their backwards are PyTorch)
    least = 1 if set(params) <= {"solve", "chunk", "wy_precision"} else 2
    assert len(launches) >= least, f"{method}: no forward and backward launches recorded ({len(launches)})"
    too_big = [f for f in compile_fits(launches) if not f.ok]
    assert not too_big, too_big


def _wy_launch(chunk=64, dim=128, **opts):
    """The fused WY kernel's launch at gated_delta_rule's shape (bf16 inputs, normalised in the kernel)."""
    from attnbench.methods.linear.wy_triton import pieces_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4 * chunk, dim, dtype=torch.bfloat16) for _ in range(3))
    g, beta = torch.randn(1, 2, 4 * chunk), torch.rand(1, 2, 4 * chunk)
    with record_launches() as launches:
        pieces_forward(q, k, v, g, beta, delta=True, chunk=chunk, normalize=True, **opts)
    assert [launch.name for launch in launches] == ["_wy_src"], launches
    return compile_launch(launches[0])


@pytest.mark.parametrize("chunk,dim,opts", [
    (64, 128, {}),  # the default chunk, the profiled width
    (64, 256, {}),
    (32, 128, {}),
    (16, 128, {}),
    (64, 128, {"dot_precision": "ieee"}),  # full fp32 dots (the default before the blocked inverse)
])
def test_fused_wy_kernel_does_not_spill_at_its_defaults(chunk, dim, opts):
    """solve: fused, the blocked inverse included, at its defaults (tf32x3 dots, blocks of 16, 8 warps above
    C = 32) and with ieee dots: no spills (ptxas), within the H200's shared memory."""
    from attnbench.methods.triton_fit import ptxas_usage

    kernel = _wy_launch(chunk, dim, **opts)
    stores, loads, registers = ptxas_usage(kernel)
    assert stores == loads == 0 and registers <= 255, (stores, loads, registers)
    assert kernel.metadata.shared <= SM90["shared_limit"], kernel.metadata.shared


def test_negative_control_fused_wy_kernel_spills_at_4_warps():
    """The same check flags a setting that spills: C = 64 with ieee dots at 4 warps (the [64, 64] FMA dots'
    operands; ~0.9 KB per thread when measured)."""
    from attnbench.methods.triton_fit import ptxas_usage

    stores, loads, _ = ptxas_usage(_wy_launch(dot_precision="ieee", num_warps=4))
    assert stores > 256 and loads > 256, (stores, loads)


def _wy_bwd_launch(chunk=64, dim=128, **opts):
    """The fused WY pieces' backward kernel's launch at gated_delta_rule's shape (bf16 inputs, normalised)."""
    from attnbench.methods.linear.wy_triton import pieces_backward

    torch.manual_seed(0)
    length = 4 * chunk
    q, k, v = (torch.randn(1, 2, length, dim, dtype=torch.bfloat16) for _ in range(3))
    g, beta = torch.randn(1, 2, length), torch.rand(1, 2, length)
    with record_launches() as launches:
        pieces_backward(q, k, v, g, beta, [None] * 6, delta=True, chunk=chunk, normalize=True, **opts)
    assert [launch.name for launch in launches] == ["_wy_bwd_src"], launches
    return compile_launch(launches[0])


@pytest.mark.parametrize("chunk,dim,opts", [
    (32, 128, {}),  # the defaults (tf32x3 dots, blocks of 16; 4 warps up to C = 32)
    (16, 128, {}),
    (64, 128, {"dot_precision": "tf32"}),  # C = 64 (8 warps) fits with tf32 dots only, see wy_triton.DEFAULTS
])
def test_fused_wy_backward_kernel_does_not_spill(chunk, dim, opts):
    """wy_backward: triton (the pieces' backward kernel: A, T recomputed, dT, dA, the [C, C] gradient tiles):
    no spills (ptxas), within the H200's shared memory. Not covered (they spill when measured, see
    wy_triton.DEFAULTS): C = 64 with the default tf32x3 dots (~0.6 KB per thread), tf32 at d = 256 (16 B).
    C = 128 needs ~296 KB of shared memory: refused (wy_triton.MAX_BACKWARD_CHUNK)."""
    from attnbench.methods.triton_fit import ptxas_usage

    kernel = _wy_bwd_launch(chunk, dim, **opts)
    stores, loads, registers = ptxas_usage(kernel)
    assert stores == loads == 0 and registers <= 255, (stores, loads, registers)
    assert kernel.metadata.shared <= SM90["shared_limit"], kernel.metadata.shared


def test_negative_control_fused_wy_backward_kernel_spills_at_4_warps():
    """The same check flags a setting that spills: the backward at its default C = 32 and 4 warps with ieee dots
    (~0.2 KB per thread when measured; at C = 64, ~9 KB, and ptxas takes 4x as long)."""
    from attnbench.methods.triton_fit import ptxas_usage

    stores, loads, _ = ptxas_usage(_wy_bwd_launch(32, dot_precision="ieee", num_warps=4))
    assert stores > 0 and loads > 0, (stores, loads)


@pytest.mark.parametrize("params, precision", [
    ({"solve": "fused", "wy_precision": "tf32"}, "tf32"),
    ({"solve": "fused", "wy_precision": "ieee", "impl": "triton"}, "ieee"),
    ({"solve": "fused", "wy_precision": "tf32x3"}, "tf32x3"),  # the option is what changes the launch
    ({"solve": "fused"}, "tf32"),  # the default (auto) on these bf16 inputs
])
def test_wy_precision_reaches_the_fused_kernel_launch(params, precision, monkeypatch):
    """``method_options.<method>.wy_precision`` through the builder, gated_delta.solve_choice and chunked: the
    fused kernel is launched with that dot precision (forward; the backward recompute is PyTorch)."""
    launches = _built_launches("gated_delta_rule", params, 128, monkeypatch)
    wy = [launch for launch in launches if launch.name == "_wy_src"]
    assert wy and {launch.kwargs["PRECISION"] for launch in wy} == {precision}


def test_probsparse_measure_kernel_compiles_for_sm90_without_spills():
    """probsparse's measurement kernel (measure: triton), compiled offline for sm_90 at the H200 rows' shape (bf16,
    d 128, 70 samples a query as at 1M): no spills, within the shared memory."""
    from attnbench.methods.triton_fit import ptxas_usage
    from attnbench.methods.sparse.probsparse_triton import measure

    q, k = (torch.randn(1, 2, 256, 128, dtype=torch.bfloat16) for _ in range(2))
    samples = torch.randint(256, (256, 70))
    with record_launches() as launches:
        measure(q, k, samples)
    assert [launch.name for launch in launches] == ["_measure_src"], launches
    kernel = compile_launch(launches[0])
    stores, loads, registers = ptxas_usage(kernel)
    assert stores == loads == 0 and registers <= 255, (stores, loads, registers)
    assert kernel.metadata.shared <= SM90["shared_limit"], kernel.metadata.shared
