"""Methods that misbehave on purpose, for the worker and gate tests (loaded as a plugin by path)."""
from __future__ import annotations

import os
import time

import torch

from attnbench.methods import Capabilities, Prepared, register_method
from attnbench.methods.exact.reference import reference_attention

CPU = dict(devices=("cpu", "cuda"), masks={"any"}, cross=True, gqa=True, decode=True)


def _good(ctx):
    mask = ctx.mask

    def attend(q, k, v):
        out, _ = reference_attention(q, k, v, mask)
        return out.to(q.dtype)

    return attend


@register_method("t_good", Capabilities(backward=False, **CPU))
def build_good(ctx):
    """Correct, uses the reference (forward only)."""
    return _good(ctx)


@register_method("t_wrong", Capabilities(backward=False, **CPU))
def build_wrong(ctx):
    """Forgets the softmax scale: exact but wrong."""
    mask = ctx.mask

    def attend(q, k, v):
        out, _ = reference_attention(q * 2.0, k, v, mask)
        return out.to(q.dtype)

    return attend


def _scaled(mask, factor):
    def attend(q, k, v):
        out, _ = reference_attention(q * factor, k, v, mask, compute_dtype=torch.float32)
        return out.to(q.dtype)

    return attend


@register_method("t_approx", Capabilities(backward=False, exact=False, family="approx", **CPU))
def build_approx(ctx):
    """The same operator as t_wrong, declared approximate with its own reference: gated against that
    reference (so ok), its distance from softmax attention recorded as approx_err."""
    return Prepared(fn=_scaled(ctx.mask, 2.0), reference=_scaled(ctx.mask, 2.0))


@register_method("t_approx_bug", Capabilities(backward=False, exact=False, family="approx", **CPU))
def build_approx_bug(ctx):
    """Approximate, and its fast path disagrees with its own reference by 1 %: a bug, so wrong."""
    fast = _scaled(ctx.mask, 2.0)
    return Prepared(fn=lambda q, k, v: fast(q, k, v) * 1.01, reference=_scaled(ctx.mask, 2.0))


@register_method("t_leaky", Capabilities(backward=False, exact=False, family="approx", **CPU))
def build_leaky(ctx):
    """Approximate, and ignores the mask: every query sees every key (a noncausal kernel under a causal mask).
    Its reference ignores the mask too, so only the leak probe can catch it."""

    def attend(q, k, v):
        scores = (q @ k.transpose(-1, -2).repeat_interleave(q.shape[1] // k.shape[1], dim=1)) / q.shape[-1] ** 0.5
        return torch.softmax(scores, dim=-1) @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)

    return Prepared(fn=attend, reference=attend)


@register_method("t_noisy", Capabilities(backward=False, exact=False, family="approx", **CPU))
def build_noisy(ctx):
    """Approximate, respects the mask, with random draws made per input in the untimed preparation (as
    random features are): fn and reference see the same draws."""
    good = _good(ctx)

    def prepare(q, k, v):
        gen = torch.Generator(device=q.device).manual_seed(7)
        return {"noise": 1e-2 * torch.randn(q.shape, generator=gen, device=q.device)}

    def attend(q, k, v, noise):
        out = good(q, k, v)
        return out + noise.to(out.dtype)

    return Prepared(fn=attend, reference=attend, prepare=prepare)


@register_method("t_no_reference", Capabilities(backward=False, exact=False, family="approx", **CPU))
def build_no_reference(ctx):
    """Approximate without a reference: cannot be gated, so an error row that says so."""
    return _good(ctx)


@register_method("t_perturbed", Capabilities(backward=True, **CPU))
def build_perturbed(ctx):
    """Exact attention times 1.01: a kernel wrong by 1 %, which the gate must catch at every length."""
    mask = ctx.mask

    class _Scaled(torch.autograd.Function):
        @staticmethod
        def forward(fctx, q, k, v):
            fctx.save_for_backward(q, k, v)
            out, _ = reference_attention(q, k, v, mask)
            return (out * 1.01).to(q.dtype)

        @staticmethod
        def backward(fctx, dout):
            q, k, v = fctx.saved_tensors
            _, grads = reference_attention(q, k, v, mask, dout=dout * 1.01)
            return tuple(g.to(q.dtype) for g in grads)

    return _Scaled.apply


@register_method("t_empty_rows", Capabilities(backward=False, **CPU))
def build_empty_rows(ctx):
    """Correct where a query sees keys, 1e4 where it sees none (the reference's rule is 0)."""
    good = _good(ctx)
    empty = ~(ctx.bound.row_counts() > 0)

    def attend(q, k, v):
        out = good(q, k, v).clone()
        out[:, :, empty.to(out.device)] = 1e4
        return out

    return attend


@register_method("t_constant", Capabilities(backward=True, **CPU))
def build_constant(ctx):
    """An output that does not depend on q, k, v: in backward modes it has no gradient path (wrong)."""
    return lambda q, k, v: torch.zeros_like(q)


@register_method("t_raises", Capabilities(backward=False, **CPU))
def build_raises(ctx):
    """Raises on the first call."""

    def attend(q, k, v):
        raise ValueError("deliberate failure")

    return attend


@register_method("t_hangs", Capabilities(backward=False, **CPU))
def build_hangs(ctx):
    """Never returns. With ATTNBENCH_TEST_HANG_MARKER set, first writes its pid to that file (so a test knows
    the worker is stuck in the call)."""

    def attend(q, k, v):
        marker = os.environ.get("ATTNBENCH_TEST_HANG_MARKER")
        if marker:
            with open(marker, "w") as handle:
                handle.write(str(os.getpid()))
        while True:
            time.sleep(1)

    return attend


@register_method("t_kills", Capabilities(backward=False, **CPU))
def build_kills(ctx):
    """Ends its own process, as a segfault or illegal memory access would."""

    def attend(q, k, v):
        os._exit(139)

    return attend


@register_method("t_oom", Capabilities(backward=False, **CPU))
def build_oom(ctx):
    """Runs out of memory."""

    def attend(q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 TiB")

    return attend


@register_method("t_cpu_oom", Capabilities(backward=False, **CPU))
def build_cpu_oom(ctx):
    """A real allocation failure of the CPU allocator: 1 PiB, beyond any machine's memory and address space."""

    def attend(q, k, v):
        torch.empty(2**50, dtype=torch.uint8)
        return q

    return attend


@register_method("t_memory_error", Capabilities(backward=False, **CPU))
def build_memory_error(ctx):
    """Python's own allocation failure (MemoryError)."""

    def attend(q, k, v):
        bytearray(2**50)
        return q

    return attend


@register_method("t_declines", Capabilities(backward=False, **CPU))
def build_declines(ctx):
    """Declines at build time."""
    from attnbench.methods import Unsupported

    raise Unsupported("t_declines never runs")


@register_method("t_recompiles", Capabilities(backward=False, compiled=True, **CPU))
def build_recompiles(ctx):
    """A compiled function whose input shape changes while it is timed: must be an error, never a slow row."""
    compiled = torch.compile(lambda x: x * 2.0, dynamic=False)
    state = {"calls": 0}
    mask = ctx.mask

    def attend(q, k, v):
        state["calls"] += 1
        width = 4 if state["calls"] == 1 else 4 + state["calls"] % 3
        compiled(torch.ones(width))
        out, _ = reference_attention(q, k, v, mask)
        return out.to(q.dtype)

    return attend
