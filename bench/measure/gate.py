"""The correctness gate: a method's output and gradients against a reference, before anything is timed.

The tolerance is a property of the working dtype alone (``TOLERANCE``), separately for the output and for
gradients, so it does not widen with length: a kernel wrong by 1 % is ``wrong`` at 4K and at 1M alike. The
values sit above what correct fused kernels err on an H200 (bf16: out ≤ 0.0058, gradients ≤ 0.0070 over
the committed core and mask runs, hd 64 and 128, 512 … 64K tokens) and below a 1 % error.

Exact methods are compared with the harness's fp32 softmax reference; approximate methods with their own
reference (``Prepared.reference``) run in fp32, so ``wrong`` means a bug in either case. Rows whose query
sees no key must be 0 in the output and in dq (the reference's rule), for exact methods.

A long case's gradients may be gated on a prefix (:class:`Prefixed`): the backward ran with an output
gradient that is 0 from position P on, so the true gradients are the reference's on the inputs' first P
positions there and 0 after; the relative error counts both parts against the same tolerance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# relative L2 error allowed, per working dtype: (output, gradients)
TOLERANCE = {"float32": (5e-5, 1e-4), "float16": (1.5e-3, 2e-3), "bfloat16": (8e-3, 9e-3)}


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in fp32 (``||got - ref||`` when the reference is all zeros)."""
    got, ref = got.detach(), ref.detach()
    diff = torch.linalg.vector_norm((got.float() - ref.float()).flatten())
    denom = torch.linalg.vector_norm(ref.float().flatten())
    return float(diff / denom) if float(denom) > 0 else float(diff)


def tolerances(dtype: str, overrides: dict | None = None) -> tuple[float, float]:
    """(output, gradient) tolerance for ``dtype``; ``overrides`` maps dtype -> number or [out, grad]."""
    value = (overrides or {}).get(dtype, TOLERANCE[dtype])
    if isinstance(value, (int, float)):
        return float(value), float(value)
    return float(value[0]), float(value[1])


class Prefixed:
    """A gradient ``grad`` from a backward whose output gradient was 0 from position ``prefix`` on, along its
    sequence axis ``axis`` (the prefix gate of long cases, ``bench/execute/case.py``). Compared with the
    reference's gradient on the inputs' first ``prefix`` positions (``want``), it must equal it before
    ``prefix`` and be 0 from ``prefix`` on: no output before ``prefix`` depends on those positions.
    :meth:`errors` gives the relative error of the whole tensor against that (``want`` padded with zeros),
    without materialising the padding or an fp32 copy of the tail (it is read ``prefix`` positions at a time)."""

    def __init__(self, grad: torch.Tensor, axis: int, prefix: int):
        self.grad, self.axis, self.prefix = grad, int(axis), int(prefix)

    @property
    def shape(self) -> torch.Size:
        """The shape the reference's prefix gradient has."""
        shape = list(self.grad.shape)
        shape[self.axis] = min(self.prefix, shape[self.axis])
        return torch.Size(shape)

    def errors(self, want: torch.Tensor) -> tuple[float, float, float]:
        """(relative error of the whole, the part before ``prefix``, the part from ``prefix`` on), each
        ``||.|| / ||want||`` (absolute norms when ``want`` is all zeros)."""
        grad = self.grad.detach()
        head = grad.narrow(self.axis, 0, self.shape[self.axis]).float()
        head_sq = float(torch.linalg.vector_norm((head - want.detach().float()).flatten()) ** 2)
        del head
        tail_sq = 0.0
        length = grad.shape[self.axis]
        for start in range(self.prefix, length, max(1, self.prefix)):
            piece = grad.narrow(self.axis, start, min(self.prefix, length - start)).float()
            tail_sq += float(torch.linalg.vector_norm(piece.flatten()) ** 2)
        denom = float(torch.linalg.vector_norm(want.detach().float().flatten()))
        denom = denom if denom > 0 else 1.0
        return (math.sqrt(head_sq + tail_sq) / denom, math.sqrt(head_sq) / denom, math.sqrt(tail_sq) / denom)


@dataclass
class Verdict:
    rel_err: float  # max over the compared tensors
    err_tol: float  # the tolerance of the tensor with the largest error relative to its own tolerance
    worst: str  # name of that tensor
    failure: str | None  # the reason of a ``wrong`` row, or None


def compare(named: list[tuple[str, torch.Tensor, torch.Tensor]], dtype: str, overrides=None) -> Verdict:
    """Gate ``(name, got, want)`` triples; the first is the output, the rest gradients. ``got`` may be a
    :class:`Prefixed` gradient (compared with ``want`` on its prefix, and with 0 after it)."""
    out_tol, grad_tol = tolerances(dtype, overrides)
    errors, tols, names, details = [], [], [], []
    for index, (name, got, want) in enumerate(named):
        if got.shape != want.shape:
            return Verdict(math.nan, out_tol, name, f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if isinstance(got, Prefixed):
            whole, head, tail = got.errors(want)
            errors.append(whole)
            details.append(f" (gated on the first {got.prefix} positions: {head:.3g} before them, {tail:.3g} "
                           f"after them, where it must be 0)")
        else:
            errors.append(rel_error(got, want))
            details.append("")
        tols.append(out_tol if index == 0 else grad_tol)
        names.append(name)
    bad = [n for n, e in zip(names, errors) if not math.isfinite(e)]
    if bad:
        return Verdict(math.nan, out_tol, bad[0], f"non-finite values in {', '.join(bad)}")
    ratios = [e / t for e, t in zip(errors, tols)]
    worst = ratios.index(max(ratios))
    verdict = Verdict(max(errors), tols[worst], names[worst], None)
    if ratios[worst] > 1.0:
        verdict.failure = (f"{names[worst]} rel_err {errors[worst]:.3g} > tolerance {tols[worst]:.3g} ({dtype})"
                           f"{details[worst]}")
    return verdict


def empty_rows_failure(out: torch.Tensor, dq: torch.Tensor | None, empty: torch.Tensor, seq_dim: int) -> str | None:
    """Queries that see no key must give output 0 and no gradient (exact methods). ``empty``: bool [seq_q]."""
    if not bool(empty.any()):
        return None
    index = [slice(None)] * out.dim()
    index[seq_dim] = empty
    rows = out.detach()[tuple(index)].float()
    if not bool(torch.isfinite(rows).all()):
        return f"{int(empty.sum())} query rows that see no key hold non-finite outputs (must be 0)"
    worst = float(rows.abs().max())
    if worst > 1e-6:
        return f"query rows that see no key must output 0, got |out| up to {worst:.3g}"
    if dq is not None:
        grad_rows = dq.detach()[tuple(index)].float()
        if not bool(torch.isfinite(grad_rows).all()) or float(grad_rows.abs().max()) > 1e-6:
            return "query rows that see no key must get zero dq"
    return None
