"""torch_varlen: torch's varlen_attn driven by each mask's varlen form. The CUDA kernel is swapped for
``varlen_reference`` (FlashAttention's contract, written plainly) so the packing, windows, layout and GQA
plumbing run through the whole harness on the CPU against the fp32 reference."""
from __future__ import annotations

import pytest
import torch

from attnbench import masks
from attnbench.execute.case import CaseRunner
from attnbench.config.plan import Case
from attnbench.methods import METHODS, Unsupported
from attnbench.methods.exact import torch_varlen

TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 2, "flush_l2": False}
VARLEN_MASKS = [
    ("full", 48), ("causal", 48), ("decode", 3), ("sliding_window(left=8,right=3)", 48),
    ("sliding_window(left=8)", 48), ("chunked_local(chunk=16)", 48), ("document(lengths=[20,18,10])", 48),
    ("document(lengths=[20,18,10],causal=True)", 48),
]


@pytest.fixture
def reference_kernel(monkeypatch):
    monkeypatch.setattr(torch_varlen, "_kernel", lambda: torch_varlen.varlen_reference)


def run_case(entry, seq_q, mode, heads_kv=2, batch=2):
    spec = masks.make_mask(entry)
    runner = CaseRunner("cpu", {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32})
    case = Case(method="torch_varlen", mask=spec.label, mask_name=spec.name, batch=batch, heads_q=4,
                heads_kv=heads_kv, seq_q=seq_q, seq_kv=48, head_dim=8, dtype="float32", mode=mode)
    return runner.run(case)


@pytest.mark.parametrize("entry, seq_q", VARLEN_MASKS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_every_varlen_mask_matches_the_reference(reference_kernel, entry, seq_q, mode):
    row = run_case(entry, seq_q, mode)
    assert row["status"] == "ok", row["reason"]
    assert row["rel_err"] < 1e-5


def test_gqa_reaches_the_kernel(reference_kernel):
    assert run_case("document(lengths=[20,18,10],causal=True)", 48, "fwd", heads_kv=1)["status"] == "ok"


def test_a_wrong_window_is_caught_by_the_gate(monkeypatch):
    """The test can fail: a kernel that ignores the window is `wrong`, not `ok`."""

    def windowless(*args, window_size=(-1, -1), enable_gqa=False):
        return torch_varlen.varlen_reference(*args, enable_gqa=enable_gqa)

    monkeypatch.setattr(torch_varlen, "_kernel", lambda: windowless)
    assert run_case("sliding_window(left=8)", 48, "fwd")["status"] == "wrong"


def test_masks_without_a_varlen_form_are_unsupported(reference_kernel):
    row = run_case("prefix_lm(prefix=10)", 48, "fwd")
    assert row["status"] == "unsupported" and "varlen form" in row["reason"]


def test_an_older_torch_without_window_size_refuses_windows_but_runs_causal():
    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        raise AssertionError("not called")

    assert torch_varlen.varlen_arguments(old, (-1, 0), gqa=False) == {"is_causal": True}
    assert torch_varlen.varlen_arguments(old, (-1, -1), gqa=False) == {"is_causal": False}
    with pytest.raises(Unsupported, match="window_size"):
        torch_varlen.varlen_arguments(old, (8, 0), gqa=False)
    with pytest.raises(Unsupported, match="enable_gqa"):
        torch_varlen.varlen_arguments(old, (-1, 0), gqa=True)


def test_causal_segments_become_a_right_window_of_zero():
    form = masks.make_mask("sliding_window(left=8)").bind(48).varlen()
    assert torch_varlen.torch_window(form) == (8, 0)
    form = masks.make_mask("document(lengths=[20,28],causal=True)").bind(48).varlen()
    assert torch_varlen.torch_window(form) == (-1, 0)
    form = masks.make_mask("sliding_window(left=8,right=3)").bind(48).varlen()
    assert torch_varlen.torch_window(form) == (8, 3)


def test_the_planner_gives_it_only_cuda_and_half_precision():
    caps = METHODS["torch_varlen"].caps
    assert caps.devices == ("cuda",) and set(caps.dtypes) == {"float16", "bfloat16"} and caps.varlen


def test_batched_offsets_repeat_each_elements_segments():
    form = masks.make_mask("document(lengths=[5,3])").bind(8).varlen()
    from attnbench.methods.exact.flash_attn import batched_cu_seqlens

    cu_q, cu_k = batched_cu_seqlens(form, 3, 8, 8, "cpu")
    assert cu_q.tolist() == cu_k.tolist() == [0, 5, 8, 13, 16, 21, 24]
    assert cu_q.dtype == torch.int32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window, lengths", [
    ((-1, -1), (100, 157, 43)), ((-1, 0), (100, 157, 43)), ((64, 0), (300,)), ((32, 16), (200, 56)),
])
def test_the_reference_states_the_cuda_kernels_contract(window, lengths):
    """On the GPU: the real kernel against ``varlen_reference`` (fp32 on the CPU), so the CPU tests above test
    the kernel's actual semantics."""
    kernel = torch_varlen._kernel()
    try:
        kwargs = torch_varlen.varlen_arguments(kernel, window, gqa=False)
    except Unsupported as exc:
        pytest.skip(str(exc))
    generator = torch.Generator(device="cuda").manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(total, 4, 64, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out = kernel(q, k, v, cu, cu, max(lengths), max(lengths), **kwargs)
    expected = torch_varlen.varlen_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), cu.cpu(), cu.cpu(),
                                             max(lengths), max(lengths), window_size=window)
    torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=2e-2)
