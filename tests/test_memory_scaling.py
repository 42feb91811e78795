"""Memory-scaling audit of the linear-time methods (families ``linear`` and ``hybrid``), on the CPU, before any
device time is spent on them.

Each audited method is built as the case runner builds it for a long case (``CaseRunner._call``: the case's inputs,
extras, parameters and ``prepare``), and run on ``meta`` tensors under :class:`metashadow.MetaShadow` (no memory,
any length): its fast path in ``fwd`` and in ``fwd_bwd`` (the gradients of everything the harness
differentiates), and its own reference as the gate calls it on a long case (``CaseRunner._own_reference`` with the
rows of ``_own_reference_rows``: a strided sample of query rows, forward only). The largest single allocation
(bytes) must stay within the method's bound in :data:`AUDIT` times :data:`SLACK`, in fp32 elements (4 B): an
expression in the length L and the method's widths, stated from what the algorithm holds (written next to it),
not fitted to what the audit measures; every bound is far below one ``[L, L]`` matrix per head. A reference that
multiplies left to right into ``[L, L]`` (Nyströmformer's, an H200 `oom` at 128K: 1 TiB asked) fails here in
milliseconds.

Shapes: batch 1, 2 heads, head dim 16 (layer width 32), fp32: small widths, so a bound is a statement in L. Each
method runs at :data:`LONG` (2^20) unless it loops in Python over L / chunk steps (the rows references over key
chunks, s4d's kernel blocks, the delta rules' and LaMamba's chunk loops): those run shorter, where L² is still
far above the bound (checked), and always above the length switches of the code (the rows gate, the references'
naive/loop maxima, s4d's kernel blocks; the delta rules' segments are set explicitly below 128K). The gate's
long-case path is forced at every length (``ref_full_pairs`` below L²), as at 1M.

Not audited this way (:data:`EXCLUDED`, each with its reason, checked where it can be): methods that refuse long
lengths, quadratic-by-design methods, and fast paths that are Triton or fla kernels (no meta execution; their
references are audited in :data:`REFERENCE_ONLY`). Decode (a one-token step and an O(d²) state) is not audited.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from attnbench import masks
from attnbench.execute.case import GATE_SAMPLE_ROWS, REF_FULL_PAIRS, CaseRunner
from attnbench.methods import METHODS, BuildContext, MaskInfo, Unsupported, as_prepared
from attnbench.methods.case import Case
from attnbench.methods.linear import common, nystrom, rows as rows_mod, s4d
from metashadow import MetaShadow, cpu_generators

LONG = 1 << 20
B, H, D = 1, 2, 16  # batch, heads, head dim
W = H * D  # a layer's width
R = GATE_SAMPLE_ROWS  # query rows the gate samples on a long case
SLACK = 2  # a bound is twice the largest tensor the algorithm needs: room for a concatenation or a padding
STREAM = common.STREAM_CHUNK  # keys per step of the kernelised rows references (feature_rows, streamed_rows)
ROWS_CHUNK = rows_mod.ROWS_CHUNK  # keys (tokens) per step of the other rows references
S4D_BUDGET = 1 << 22  # s4d_rows' default budget: its complex128 weights [width, N/2, T] hold at most this many
SEGMENT = 4096  # the delta rules' segment here (explicit: 'auto' segments only above 128K)


def rows_in(L: int, keys: int) -> int:
    """The sampled rows a causal stream finishes in one key chunk: the R rows are strided over L, so a chunk of
    ``keys`` holds the last key of at most R·keys/L + 1 of them."""
    return min(R, R * keys // L + 1)


@dataclass(frozen=True)
class Audit:
    """One method's audit: the length, the bounds (fp32 elements as functions of L, before ``SLACK``) of its
    fast path and of its reference (None: an exact method, gated on the harness's own reference), why, and
    hyper-parameters (defaults where not given)."""

    length: int
    fast: Callable[[int], int] | None
    reference: Callable[[int], int] | None
    why: str
    params: dict = field(default_factory=dict)
    mask: str = "causal"


def _kernelized(features: int) -> Audit:
    return Audit(1 << 18, lambda L: B * H * L * max(128, features, D),
                 lambda L: B * H * STREAM * max(rows_in(L, STREAM), features, D),
                 f"fast: the intra-chunk scores [L/128, 128, 128] per head (chunk 128), features [L, {features}]; "
                 f"reference: per key chunk ({STREAM}) the scores of the rows it finishes and the chunk's features")


def _delta(rows_width: Callable[[int], int], length: int = 1 << 14) -> Audit:
    return Audit(length, lambda L: B * H * max(L * D, SEGMENT * max(64, 2 * D)), rows_width,
                 f"fast: [L, d] inputs and output; per segment ({SEGMENT}) the WY blocks [S/64, 64, 64] and "
                 f"[S/64, 64, 2d] (chunk 64); reference: per key piece ({STREAM}) the same with chunk 32 (delta), or "
                 "the rows' decayed scores [rows, piece] (simple_gla)", params={"segment": SEGMENT})


AUDIT: dict[str, Audit] = {
    "linear_attn": _kernelized(D),
    "performer": _kernelized(round(D * math.log(D))),  # m = round(d ln d)
    "rfa": _kernelized(2 * 2 * D),  # sin and cos of D = 2d projections
    "cosformer": _kernelized(2 * D),
    "abc": Audit(1 << 18, lambda L: B * H * L * max(128, 64, D),
                 lambda L: B * H * ROWS_CHUNK * max(rows_in(L, ROWS_CHUNK), 64, D),
                 "fast: three chunked passes (chunk 128): scores [L/128, 128, 128], controls and slot weights "
                 "[L, 64 slots] per head; reference: per key chunk the rows' slot reads and the chunk's controls"),
    "aaren": Audit(1 << 18, lambda L: B * max(L * W, H * (L // 512) ** 2),
                   lambda L: B * max(H * R * ROWS_CHUNK, ROWS_CHUNK * W),
                   "fast: keys, values [L, width]; the chunk prefix matrix [N, N] (N = L / chunk, chunk 512 = √L "
                   "here); reference: the rows' scores against a key chunk [rows, chunk] per head"),
    "s4d": Audit(1 << 18, lambda L: max(4 * B * L * W, 2 * W * 32 * s4d.KERNEL_BLOCK), lambda L: 4 * S4D_BUDGET,
                 "fast: the FFT over 2L of [width, L] (complex64: 4 fp32 per token and channel, in its "
                 "backward) and one kernel block's powers [width, N/2, 2048]; reference: the float64 rows form's "
                 "complex128 weights (at most its budget)"),
    "metamixer": Audit(LONG, lambda L: B * (L + 14) * W, lambda L: B * R * 13 * W,
                       "fast: [L, width] and the padded conv input [L + k - 1, width]; reference: each row's "
                       "window of k1 + k2 - 1 tokens"),
    "linear_infsa": Audit(LONG, lambda L: B * H * L * D, lambda L: B * H * L * D,
                          "one pooled query: [L, d] per head in both forms (the reference pools every token)",
                          mask="full"),
    "nystromformer": Audit(LONG, lambda L: B * H * L * max(64, D), lambda L: B * H * L * max(64, D),
                           "the kernels [L, landmarks] and [landmarks, L] per head (64 landmarks), right to left",
                           mask="full"),
    "softmax_rnn": Audit(1 << 17, lambda L: B * H * L * max(1024, D), None,
                         "exact softmax, O(L²) work: all queries against a key block [L, 1024] per head "
                         "(block 1024); gated on the harness's own fp32 reference, not its own"),
    "gated_delta_rule": _delta(lambda L: B * H * STREAM * max(32, 2 * D)),
    "delta_rule": _delta(lambda L: B * H * STREAM * max(32, 2 * D)),
    # 2^15: at 2^14 a key chunk of 8192 finishes half the sampled rows, too near L² for the check below
    "simple_gla": _delta(lambda L: B * H * STREAM * max(rows_in(L, STREAM), D), length=1 << 15),
    "lamamba": Audit(1 << 16, lambda L: B * L * max(2 * W + 2 * H * 64 + H, H * 256, H * 64),
                     lambda L: B * max(R * 256 * W, (ROWS_CHUNK + 3) * (2 * W + 2 * H * 64 + H), H * ROWS_CHUNK * 128),
                     "fast: the in-projection [L, 2·width + 2·H·N + H] (N = 64), the windows' dense scores "
                     "[L/256, 256, 256] per head (on meta SDPA always runs its math form; that a fused kernel takes "
                     "the windows is checked below), the scan's [L/64, 64, 64] blocks; "
                     "reference: the rows' windows (256 tokens), one piece's projection and scan blocks"),
}

# fast paths that are kernels (no meta execution): their references are audited (bound: as the own method's)
REFERENCE_ONLY: dict[str, tuple[Audit, str]] = {
    "linear_attn_triton": (dataclasses.replace(AUDIT["linear_attn"], fast=None), "Triton kernels"),
    "simple_gla_triton": (dataclasses.replace(AUDIT["simple_gla"], fast=None, params={}), "Triton kernels"),
    "fla_linear_attn": (dataclasses.replace(AUDIT["linear_attn"], fast=None), "fla's kernels (fla needs a GPU)"),
    "fla_simple_gla": (dataclasses.replace(AUDIT["simple_gla"], fast=None, params={}), "fla's kernels"),
    "fla_delta_rule": (dataclasses.replace(AUDIT["delta_rule"], fast=None, params={}), "fla's kernels"),
    "fla_gated_delta_rule": (dataclasses.replace(AUDIT["gated_delta_rule"], fast=None, params={}), "fla's kernels"),
}

EXCLUDED: dict[str, str] = {
    "nats_l": "refuses lengths above max_len (8192) in its dense softmax form (the default off CUDA, and on meta); "
              "the flex form (CUDA only: FlexAttention tiles, no [L, L]) is not audited here",
    "tensor_attn": "refuses lengths above max_len: cubic (tensor) attention",
    "lla": "refuses lengths above max_len: a direct solve per query",
    "infsa": "quadratic by design (pure InfSA, O(L² d) time): the fast path holds [block, L] score blocks, "
             "the reference [L, L]; no rows= form and no length refusal",
}
REFUSES_LONG = ("nats_l", "tensor_attn", "lla")


# ---- the audit --------------------------------------------------------------------------------------------------
@dataclass
class Measured:
    largest: int  # bytes of the largest new storage
    where: tuple | None  # (op, shape, dtype)
    ops: int


def _case(method: str, audit: Audit, mode: str) -> Case:
    return Case(method=method, mask=audit.mask, mask_name=audit.mask, batch=B, heads_q=H, heads_kv=H,
                seq_q=audit.length, seq_kv=audit.length, head_dim=D, dtype="float32", mode=mode)


def run_audit(method: str, audit: Audit, mode: str, *, reference: bool = True, edit=None):
    """(fast path, reference) measurements of ``method`` in ``mode`` on meta tensors, built and called as the
    case runner does (``edit(prepared) -> prepared``: a deliberately broken variant, for the negative controls).
    The reference runs on the gate's long-case rows where it takes ``rows=`` (else whole, with gradients in
    backward modes, as the gate)."""
    case = _case(method, audit, mode)
    length = audit.length
    options = {"timing": {}, "method_options": {method: dict(audit.params)},
               "ref_full_pairs": min(REF_FULL_PAIRS, length * length - 1)}  # the gate's long-case path
    runner = CaseRunner("meta", options)
    caps = METHODS[method].caps
    bound = masks.make_mask(case.mask).bind(length, length)
    ctx = BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("meta"),
                       dtype=torch.float32, options=options, params=dict(audit.params))
    with cpu_generators():
        with MetaShadow():
            prepared = as_prepared(METHODS[method].build(ctx))
            if edit is not None:
                prepared = edit(prepared)
            call = runner._call(case, caps, prepared, recurrent=False)
        fast = None
        if audit.fast is not None:
            _, first = runner._closures(mode, prepared, call, recurrent=False)
            with MetaShadow() as shadow:
                first()
            fast = Measured(shadow.largest, shadow.where, shadow.ops)
        ref = None
        if reference and audit.reference is not None:
            rows = CaseRunner("cpu", options)._own_reference_rows(case, caps, prepared, recurrent=False)
            bshd = caps.input_layout == "bshd"
            with MetaShadow() as shadow:
                runner._own_reference(case, caps, prepared, call, bshd, False, rows)
            ref = Measured(shadow.largest, shadow.where, shadow.ops)
    return fast, ref


def _check(method: str, form: str, measured: Measured, bound_elements: int) -> None:
    assert measured.ops > 0 and measured.largest > 0, f"{method} {form}: nothing ran"
    limit = SLACK * bound_elements * 4
    assert measured.largest <= limit, (
        f"{method} {form}: largest allocation {measured.largest / 4 / 2**20:.1f} Mi fp32 elements "
        f"({measured.where}) above the bound {limit / 4 / 2**20:.1f} Mi")


def _modes(method: str) -> tuple[str, ...]:
    return ("fwd", "fwd_bwd") if METHODS[method].caps.backward else ("fwd",)


@pytest.mark.parametrize("method", sorted(AUDIT))
def test_fast_path_and_reference_stay_within_the_bound(method):
    audit = AUDIT[method]
    for mode in _modes(method):
        # the reference's rows path is the same in every mode (forward only): measured once
        fast, ref = run_audit(method, audit, mode, reference=mode == "fwd")
        _check(method, f"fast path ({mode}, L={audit.length})", fast, audit.fast(audit.length))
        if ref is not None:
            _check(method, f"reference (L={audit.length})", ref, audit.reference(audit.length))


@pytest.fixture
def stub_kernels(monkeypatch):
    """Builds of the kernel methods on the CPU: Triton's interpreter flag (the builders check it, nothing is
    launched), and fla's operators as stubs that raise (fla needs a GPU; only the references run here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def not_here(*args, **kwargs):
        raise AssertionError("fla's kernel is not audited")

    for name in ("fla", "fla.ops", "fla.ops.linear_attn", "fla.ops.simple_gla", "fla.ops.delta_rule",
                 "fla.ops.gated_delta_rule"):
        module = types.ModuleType(name)
        op = name.rsplit(".", 1)[-1]
        setattr(module, f"chunk_{op}", not_here)
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("method", sorted(REFERENCE_ONLY))
def test_kernel_methods_references_stay_within_the_bound(stub_kernels, method):
    audit, _ = REFERENCE_ONLY[method]
    _, ref = run_audit(method, audit, "fwd")
    _check(method, f"reference (L={audit.length})", ref, audit.reference(audit.length))


def test_every_linear_and_hybrid_method_is_audited_or_excluded_with_a_reason():
    own = {name for name, spec in METHODS.items()
           if spec.caps.family in ("linear", "hybrid") and spec.module.startswith("attnbench.methods.")}
    listed = set(AUDIT) | set(REFERENCE_ONLY) | set(EXCLUDED)
    assert own == listed, f"not listed: {sorted(own - listed)}; listed but not registered: {sorted(listed - own)}"
    assert not (set(AUDIT) & set(EXCLUDED)) and all(EXCLUDED.values())


@pytest.mark.parametrize("method", REFUSES_LONG)
def test_excluded_methods_refuse_long_lengths(method):
    audit = Audit(LONG, None, None, "")
    with pytest.raises(Unsupported, match="max_len"):
        run_audit(method, audit, "fwd")


def test_every_bound_is_far_below_a_length_squared_matrix():
    """A bound near L² would let the bug this audit is for pass: each is at most 1/64 of one [L, L] per head."""
    for method, audit in {**AUDIT, **{m: a for m, (a, _) in REFERENCE_ONLY.items()}}.items():
        L = audit.length
        for bound in (audit.fast, audit.reference):
            if bound is not None:
                assert SLACK * bound(L) * 64 <= H * L * L, (method, L, bound(L))


# ---- negative controls: deliberately broken variants the audit catches -------------------------------------------
def test_a_left_to_right_nystrom_reference_is_caught():
    """Nyströmformer's reference before its fix (F · A⁺ · B first: an [L, L] matrix; 1 TiB asked at 128K on the
    H200) fails the audit; the method's own passes (test above)."""

    def left_to_right(prepared):
        def reference(q, k, v, rows=None):
            scale = 1.0 / math.sqrt(q.shape[-1])
            k_land = nystrom.averaging_matrix(k.shape[2], 64, k.device) @ k
            q_land = nystrom.averaging_matrix(q.shape[2], 64, q.device) @ q
            kernel_q = torch.softmax(q[:, :, rows] @ k_land.transpose(-1, -2) * scale, -1)
            kernel_a = torch.softmax(q_land @ k_land.transpose(-1, -2) * scale, -1)
            kernel_k = torch.softmax(q_land @ k.transpose(-1, -2) * scale, -1)
            return kernel_q @ nystrom.iterative_pinv(kernel_a, 6) @ kernel_k @ v

        return dataclasses.replace(prepared, reference=reference)

    audit = AUDIT["nystromformer"]
    _, ref = run_audit("nystromformer", audit, "fwd", edit=left_to_right)
    assert ref.largest >= R * audit.length * 4  # [rows, L] per head at least: caught below
    with pytest.raises(AssertionError, match="above the bound"):
        _check("nystromformer", "reference", ref, audit.reference(audit.length))


def test_a_quadratic_fast_path_is_caught_in_forward_and_backward():
    """linear_attn's fast path replaced by the quadratic masked form (what its reference does below 2^26 pairs):
    an [L, L] score matrix per head, caught in fwd and in fwd_bwd."""

    def quadratic(prepared):
        def fn(q, k, v):
            fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
            return common.naive_linear(fq, fk, v, causal=True, offset=0, eps=1e-6)

        return dataclasses.replace(prepared, fn=fn)

    audit = dataclasses.replace(AUDIT["linear_attn"], length=1 << 14)
    for mode in ("fwd", "fwd_bwd"):
        fast, _ = run_audit("linear_attn", audit, mode, reference=False, edit=quadratic)
        assert fast.largest >= H * audit.length ** 2 * 4, (mode, fast.where)
        with pytest.raises(AssertionError, match="above the bound"):
            _check("linear_attn", mode, fast, audit.fast(audit.length))


# ---- the tool itself ------------------------------------------------------------------------------------------------
def test_meta_shadow_keeps_small_integers_real_and_measures_what_it_does_not_compute():
    L = LONG
    q = torch.empty(1, 2, L, 16, device="meta", requires_grad=True)
    rows = torch.linspace(0, L - 1, R).round().long()
    with MetaShadow() as shadow:
        here = ((rows >= 0) & (rows < 8192)).nonzero().squeeze(1)  # data-dependent: real on the CPU
        picked = q[:, :, rows[here]]
        assert here.device.type == "cpu" and int(rows.max()) == L - 1 and picked.shape == (1, 2, here.numel(), 16)
        positions = torch.arange(L, device="meta")
        visible = positions[:, None] <= positions[None, :]  # too large to compute: answered on meta, measured
        assert visible.device.type == "meta"
    assert shadow.largest == L * L  # bool [L, L]
    with MetaShadow() as shadow:  # backward ops run through the mode: the [L, L] gradient of the scores
        scores = q @ q.transpose(-1, -2)[..., :128]
        torch.autograd.grad(scores.sum(), q)
    assert shadow.largest == 2 * L * 128 * 4
    with MetaShadow() as shadow:
        q.detach()[:, :, :5].transpose(1, 2)  # views: no allocation
    assert shadow.largest == 0


@pytest.mark.parametrize("layout", ["contiguous", "slice", "select", "broadcast", "expanded", "transposed", "scalar"])
def test_meta_shadow_pointwise_shortcut_matches_the_meta_kernel(layout):
    base = torch.empty(2, 3, 8, 5, device="meta")
    other = {"contiguous": torch.empty(2, 3, 8, 5, device="meta"),
             "slice": torch.empty(2, 3, 16, 5, device="meta")[:, :, ::2],
             "select": torch.empty(2, 3, 4, 8, 5, device="meta")[:, :, 1],
             "broadcast": torch.empty(2, 1, 8, 1, device="meta"),
             "expanded": torch.empty(2, 1, 8, 5, device="meta").expand(2, 3, 8, 5),
             "transposed": torch.empty(2, 3, 5, 8, device="meta").transpose(-1, -2),
             "scalar": 0.5}[layout]
    for op in (torch.add, torch.sub, torch.mul, torch.div):
        for a, b in ((base, other), (other, base)):  # the first operand's layout leads TensorIterator's choice
            if not isinstance(a, torch.Tensor):
                continue
            want = op(a, b)
            with MetaShadow():
                got = op(a, b)
            assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype), (op, layout)


# ---- what meta cannot show: which SDPA kernel a fast path reaches ----------------------------------------------------
def test_lamamba_window_attention_reaches_a_fused_sdpa_kernel(monkeypatch):
    """SDPA's fused kernels take 4-D inputs only. LaMamba's windows went in 5-D ([B, H, n, window, P]), so SDPA ran
    its math form, which holds the [n, window, window] scores per head: on the H200 too (16 GiB fp32 per tensor,
    several at once, at 1M tokens and 16 heads; lamamba's `oom` rows at 512K-1M). Meta always takes the math form,
    so the audit above cannot see it: the inputs of the SDPA call are checked here on the CPU (whose fused choice
    applies the same 4-D rule). Negative control: the 5-D layout gets the math form."""
    from torch.nn.attention import SDPBackend

    from test_linear_methods import _build

    math_form = SDPBackend.MATH.value
    choices = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        choices.append((q.dim(), torch._fused_sdp_choice(q, k, v, **kwargs)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    prepared = _build("lamamba", "causal", 40, 40, params={"window": 16, "state_size": 4, "chunk": 8})
    prepared.fn(torch.randn(1, 40, 16))
    assert choices and all(dim == 4 and choice != math_form for dim, choice in choices), choices
    windows = torch.randn(1, 2, 3, 16, 8)  # [B, H, n, window, P]: the layout before the fix
    assert torch._fused_sdp_choice(windows, windows, windows, is_causal=True) == math_form
