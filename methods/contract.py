"""The method contract (v2): what a builder gets and what it returns.

A method is a *builder*, ``build(ctx: BuildContext) -> Prepared | fn``. It runs once per case, outside the
timed region, and returns a :class:`Prepared` (or, for the simplest exact kernels, the timed function alone,
which is shorthand for ``Prepared(fn)``). The harness then, for each case:

1. makes the inputs (q, k, v and every :class:`Extra` the method declares) from the case's shapes and seed;
2. calls ``prepare(q, k, v, **extras)`` once, untimed, for per-input state that is *not* the method (random
   feature draws, a redraw policy's sample); what it returns (a dict) is passed to ``fn`` and ``reference`` as
   keyword arguments. Routing, clustering or search that the method does per input is the method, and so
   belongs in ``fn``, timed;
3. gates ``fn`` against a reference before timing it: exact methods against the harness's fp32 softmax
   reference; approximate methods (``Capabilities.exact=False``) against their *own* ``reference`` (their
   readable naive form, like flash-linear-attention's ``naive.py``), with the same dtype rule, so ``wrong``
   still means a bug. Their distance from exact softmax attention is recorded as ``approx_err``, never gated.
   Above ``correctness.ref_full_pairs`` the output is gated on sampled rows and the gradients on the first P
   positions, where the mask is closed at P and the method declares ``Capabilities.prefix_closed`` (then its
   ``reference`` gets the per-token inputs cut at P: it must take any length);
4. times ``fn`` (CUDA events) and, in backward modes, the gradients of q, k, v, every extra with ``grad=True``
   and every tensor in ``parameters``.

Conventions: q ``[batch, heads_q, seq_q, head_dim]``, k and v ``[batch, heads_kv, seq_kv, head_dim]`` (SDPA's
layout; ``Capabilities.input_layout="bshd"`` swaps seq and heads). The mask is causal *bottom-right*: query
``i`` sits at key position ``i + mask.offset`` with ``offset = seq_kv - seq_q`` (see :class:`MaskInfo`).
A query that sees no key has output 0. References compute in the dtype of their inputs (the harness calls
them with fp32 copies for the gate; the tolerance is the working dtype's fixed value, ``bench/measure/gate.py``
``TOLERANCE``, not sized from a working-dtype run).

Layer-level methods (``Capabilities.form="layer"``) are modules over ``x [batch, seq, d_model]`` with
``d_model = heads_q * head_dim``: ``fn(x) -> y`` and ``reference(x) -> y``, with their FLOPs declared in
``Prepared.flops``. The task models use them directly; kernel-form methods are wrapped in projections.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

EXTRA_INITS = ("randn", "uniform", "logsigmoid", "ones", "zeros")


@dataclass(frozen=True)
class Extra:
    """An extra input the harness creates for the method, seeded from the case.

    ``shape``: the full shape (the builder knows the case's sizes). ``init``: ``randn`` (times ``scale``),
    ``uniform`` in [0, 1), ``logsigmoid`` (log of a gate in (0, 1), as gated linear attention takes it),
    ``ones`` or ``zeros``. ``dtype``: None for the case's dtype, or a torch dtype name (``"float32"``).
    ``grad``: receives a gradient in backward modes, which the gate compares with the reference's.
    """

    shape: tuple[int, ...]
    init: str = "randn"
    scale: float = 1.0
    dtype: str | None = None
    grad: bool = True

    def __post_init__(self):
        if self.init not in EXTRA_INITS:
            raise ValueError(f"Extra.init must be one of {EXTRA_INITS}, got {self.init!r}")
        if any((not isinstance(s, int)) or s < 1 for s in self.shape):
            raise ValueError(f"Extra.shape must be positive ints, got {self.shape!r}")

    def make(self, generator: torch.Generator, device, dtype: torch.dtype) -> torch.Tensor:
        dtype = getattr(torch, self.dtype) if self.dtype else dtype
        if self.init in ("ones", "zeros"):
            return (torch.ones if self.init == "ones" else torch.zeros)(self.shape, device=device, dtype=dtype)
        if self.init == "uniform":
            base = torch.rand(self.shape, generator=generator, device=device, dtype=torch.float32)
        else:
            base = torch.randn(self.shape, generator=generator, device=device, dtype=torch.float32) * self.scale
            if self.init == "logsigmoid":
                base = torch.nn.functional.logsigmoid(base)
        return base.to(dtype)


@dataclass
class RecurrentDecode:
    """Decode through a recurrent state (for methods whose state does not grow with the context).

    ``prefill(q, k, v, **extras) -> state``: untimed; builds the state from the cache's first ``L - 1``
    tokens (q, k, v hold those tokens). ``step(state, q, k, v, **extras) -> out``: timed; one new token
    (q, k, v of length 1), returns its output ``[batch, heads_q, 1, head_dim_v]`` and must not modify
    ``state`` in place (the harness calls it repeatedly on the same state). ``state_bytes(state)``: bytes of
    the state per batch (default: all tensors in the state, divided by the batch size).
    """

    prefill: Callable[..., Any]
    step: Callable[..., torch.Tensor]
    state_bytes: Callable[[Any], int] | None = None


@dataclass
class StateScan:
    """The method as a scan over contiguous pieces of the sequence, for context parallelism by state
    passing (``layout=state_pass``): each rank holds one piece (self-attention, seq_q == seq_kv).

    ``summary(q, k, v, positions, **kw) -> tuple of tensors``: the piece's effect on the recurrent state,
    from a zero state (linear attention: ``(Σ φ(k) vᵀ, Σ φ(k))``; a gated recurrence ``S ↦ M S + b``:
    ``(M, b)``). ``combine(earlier, later) -> tuple``: the effect of two pieces in sequence order
    (associative, not necessarily commutative). ``finish(q, k, v, positions, incoming, **kw) -> out``: the
    piece's outputs given the combined summary of the pieces its queries see besides their own (the earlier
    pieces for a causal mask, every other piece for the full mask; ``None`` when there is none).
    ``positions``: the absolute positions of the piece's tokens (ascending). ``token_extras``: names of the
    extras with a token axis (dim 2), sharded like the sequence; other keyword arguments go to every rank
    whole. Each rank calls ``summary`` and ``finish`` on its piece; the harness gathers the summaries.
    """

    summary: Callable[..., tuple]
    combine: Callable[[tuple, tuple], tuple]
    finish: Callable[..., torch.Tensor]
    token_extras: tuple[str, ...] = ()


def _tensors(obj: Any):
    """Every tensor inside ``obj``: tensors, and sequences, mappings and dataclasses of them (a state class such as
    ``LinearState(S, z)``)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside ``obj`` (tensors, and sequences, mappings and dataclasses of them)."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def tensor_elements(obj: Any) -> int:
    """Elements of every tensor inside ``obj`` (as :func:`tensor_bytes`, counting numbers instead of bytes)."""
    return sum(t.numel() for t in _tensors(obj))


@dataclass
class Prepared:
    """What a builder returns. Only ``fn`` is required.

    ``fn(q, k, v, **extras, **prepared)``: the timed call. ``reference``: the method's own readable form with
    the same signature (approximate methods must give one; exact methods may, and are then still gated against
    exact softmax). ``prepare(q, k, v, **extras) -> dict``: untimed per-input preparation (see module doc).
    ``extras``: name -> :class:`Extra`, created by the harness. ``parameters``: learnable tensors (they get
    gradients in backward modes and count in memory). ``attended_pairs(q, k, v, **extras, **prepared) -> int``:
    the (query, key) pairs the method actually attends, summed over batch and query heads (data-dependent for
    routed methods; untimed). ``decode``: recurrent decoding. ``flops``: FLOPs of one forward call, for
    layer-form methods or methods whose work is not attention-shaped (the row then reports TFLOP/s on these).
    ``phases``: name -> ``callable(q, k, v, **extras, **prepared)`` for parts of ``fn`` the harness times
    alone (e.g. ``{"routing": ...}``), reported as a share of the call. ``softmax_comparable``: False for
    methods that are a different operator, whose distance from softmax attention means nothing (their row
    says so instead of giving ``approx_err``). ``state_scan``: the method as a scan over sequence pieces
    (:class:`StateScan`), for the ``state_pass`` CP layout. ``chunk``: the token block of a chunked form (a
    linear method's chunk), where it has one: the prefix a long case's gradients are gated on
    (``Capabilities.prefix_closed``) is a multiple of it, so the chunks before it are the same chunks.
    """

    fn: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor] | None = None
    prepare: Callable[..., dict] | None = None
    extras: dict[str, Extra] = field(default_factory=dict)
    parameters: Sequence[torch.Tensor] = ()
    attended_pairs: Callable[..., int] | None = None
    decode: RecurrentDecode | None = None
    flops: float | None = None
    phases: dict[str, Callable[..., Any]] = field(default_factory=dict)
    softmax_comparable: bool = True
    state_scan: StateScan | None = None
    chunk: int | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError("Prepared.fn must be callable")
        if self.chunk is not None and (isinstance(self.chunk, bool) or not isinstance(self.chunk, int)
                                       or self.chunk < 1):
            raise ValueError(f"Prepared.chunk must be a positive int or None, got {self.chunk!r}")
        for name, extra in self.extras.items():
            if name in ("q", "k", "v", "x"):
                raise ValueError(f"extra input name {name!r} clashes with a main input")
            if not isinstance(extra, Extra):
                raise TypeError(f"Prepared.extras[{name!r}] must be an Extra, got {type(extra).__name__}")
        self.parameters = tuple(self.parameters)


def as_prepared(built: Any) -> Prepared:
    """A builder's return value as a :class:`Prepared` (a bare callable is ``Prepared(fn)``)."""
    if isinstance(built, Prepared):
        return built
    if callable(built):
        return Prepared(fn=built)
    raise TypeError(f"a method builder must return a Prepared or a callable, got {type(built).__name__}")


@dataclass(frozen=True)
class MaskInfo:
    """The case's mask as typed data, for builders (no undocumented attributes to discover).

    ``causal``: the mask hides every key after the query's aligned position. ``offset``: query ``i`` sits
    at key position ``i + offset`` (bottom-right alignment: ``seq_kv - seq_q``; top-left: 0).
    ``full``: every pair visible. ``window``: ``(left, right)`` keys around the aligned position for
    sliding-window masks, else None. ``varlen``: the mask's packed form (segments as ``cu_seqlens`` with a
    window, ``masks.base.VarlenForm``) where it has one, else None; a document mask's documents are its
    segments. ``params``: the mask's parameters. ``bound``: the ``BoundMask`` itself (``mask_mod``,
    ``dense``, block layouts) for anything else.
    """

    name: str
    label: str
    seq_q: int
    seq_kv: int
    causal: bool
    offset: int
    full: bool
    window: tuple[int, int] | None
    varlen: Any
    params: dict
    bound: Any

    @classmethod
    def of(cls, bound) -> "MaskInfo":
        spec = bound.spec
        params = spec.params() if hasattr(spec, "params") else {}
        offset = int(getattr(bound, "offset", bound.seq_kv - bound.seq_q))
        window = None
        if "left" in params and "right" in params and spec.name == "sliding_window":
            window = (int(params["left"]), int(params["right"]))
        try:
            varlen = bound.varlen()
        except Exception:  # a mask without a packed form
            varlen = None
        return cls(
            name=spec.name, label=spec.label, seq_q=bound.seq_q, seq_kv=bound.seq_kv, causal=bool(spec.causal),
            offset=offset, full=spec.name == "full", window=window, varlen=varlen, params=dict(params), bound=bound,
        )

    @property
    def is_plain_causal(self) -> bool:
        """Exactly causal (bottom-right aligned): query i sees keys 0 .. i + offset."""
        return self.name in ("causal", "decode") and self.offset == self.seq_kv - self.seq_q
