"""The method registry: every attention implementation, with the capabilities it declares.

A method is a *builder*: ``build(ctx) -> Prepared`` (or the timed ``fn(q, k, v) -> out`` alone, for a plain
exact kernel); the contract — own reference, untimed preparation, parameters, extra inputs, recurrent decode,
attended pairs, layer form — is in ``methods.contract``. Everything that is not the attention itself — block
masks, compiled functions, dense masks, parameters, workspaces — is made in the builder, outside the timed
region. A builder that finds at run time that it cannot run the case raises ``Unsupported(reason)``.

Hyper-parameters: a builder reads ``method_options.<method>.<name>`` through ``ctx.param(name, default)`` (or
``ctx.params``). A key the method does not take is refused, never ignored (a misspelt ``blokc_v`` would
otherwise run the default and look like a measurement of the option): ``register_method(..., options=(...))``
declares the names a method takes, checked when the config is planned and again before the builder runs; for a
method that declares none (a plugin), every key given must have been read by the time the builder returns.
Either way the error is :class:`UnknownOption`, naming the field (``method_options.<method>.<key>``). So read
(and validate) every option in the builder, on every path that uses it: a read inside ``fn``, at call time,
comes after the check; an option that only one path uses (``impl: triton``'s ``block_v``) is refused by the
method on the other paths with its own reason, or it is refused as unused.

Capabilities are opt-in: a method declared with no more than a family runs full and causal self-attention,
forward only; cross-attention, GQA, backward and decode are each declared.

The planner reads the declared capabilities to decide, before any work, which cases a method gets; the
correctness gate checks the declaration against an fp32 reference.

    from attnbench.methods import register_method, Capabilities

    @register_method("my_attn", Capabilities(family="exact", masks={"full", "causal"}))
    def build_my_attn(ctx):
        return lambda q, k, v: my_kernel(q, k, v, causal=ctx.mask.causal)
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from .case import Case
from .contract import MaskInfo

ANY_MASK = "any"


class Unsupported(Exception):
    """The method cannot run this case; the message is the reason shown in the row."""


class UnknownOption(ValueError):
    """A key of ``method_options.<method>`` that the method does not take (the message names the field)."""


def unknown_option_message(method: str, keys, takes) -> str:
    """``method_options.<method>.<key>: not an option of <method> (its options: ...)`` for ``keys`` (sorted)."""
    keys = sorted(keys, key=str)
    fields = ", ".join(f"method_options.{method}.{key}" for key in keys)
    what = "not an option" if len(keys) == 1 else "not options"
    takes = sorted(takes, key=str)
    listing = f"its options: {', '.join(takes)}" if takes else "it takes no options"
    return f"{fields}: {what} of {method} ({listing})"


class OptionReads(dict):
    """A method's options (``method_options.<method>``, a plain mapping) that records every key looked up
    (``[]``, ``get``, ``pop``, ``setdefault``) in ``read``: the keys the builder read, used or defaulted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def pop(self, key, *default):
        self.read.add(key)
        return super().pop(key, *default)

    def setdefault(self, key, default=None):
        self.read.add(key)
        return super().setdefault(key, default)


@dataclass(frozen=True)
class Capabilities:
    """What a method declares it can do. The planner gives it only cases inside this declaration.

    ``masks``: mask names run natively, or ``{"any"}`` for methods that take any ``mask_mod``.
    ``dense_mask``: runs any other mask through a dense boolean tensor (costs seq_q * seq_kv bytes; the
    planner refuses it above the dense budget).
    ``dtypes_by_device``: device kind -> the dtypes the method takes there, where that differs from ``dtypes``
    (SDPA's flash backend: fp32 on the CPU kernel, only fp16/bf16 on CUDA); a mapping, kept as sorted pairs.
    """

    family: str = "exact"
    exact: bool = True
    masks: frozenset[str] = frozenset({"full", "causal"})
    dense_mask: bool = False
    cross: bool = False  # seq_q != seq_kv (encoder memory, bottom-right causal)
    gqa: bool = False  # heads_kv < heads_q
    backward: bool = False  # bwd and fwd_bwd modes
    decode: bool = False  # decode mode (one query against a cache; Prepared.decode for a recurrent state)
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    dtypes_by_device: Any = ()  # {"cuda": ("float16", "bfloat16")}: per-device dtypes overriding ``dtypes``
    devices: tuple[str, ...] = ("cpu", "cuda")
    head_dims: tuple[int, ...] | None = None  # None: any
    max_head_dim: int | None = None
    requires: tuple[str, ...] = ()  # importable modules
    cp_ready: bool = False
    trainable: bool = False
    compiled: bool = False  # uses torch.compile: compile time recorded apart, recompiles guarded
    materializes: bool = False  # builds the [B, H, Sq, Skv] score matrix: the planner checks its size first
    input_layout: str = "bhsd"  # "bhsd" (SDPA) or "bshd" (flash-attn); the harness lays inputs out so
    varlen: bool = False  # runs any mask whose varlen form exists (cu_seqlens + window), natively
    declines: tuple[str, ...] = ()  # substrings of errors that mean "this backend declined the case"
    form: str = "qkv"  # "qkv": fn(q, k, v); "layer": a module fn(x) over [batch, seq, heads_q * head_dim]
    causal_only: bool = False  # runs causal masks only (recurrences, scans): noncausal cases are unsupported
    # outputs before any position P depend on the inputs before P only, whenever the mask lets no query before P
    # see a key at or after P (causal per token): the gate then checks a long case's gradients on a prefix
    # (``closed_on_prefixes``; None: True for exact q/k/v methods, False for methods gated by their own reference)
    prefix_closed: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "masks", frozenset(self.masks))
        by_device = dict(self.dtypes_by_device)
        for kind, dtypes in by_device.items():
            if isinstance(dtypes, str) or not all(isinstance(d, str) for d in dtypes):
                raise ValueError(f"Capabilities.dtypes_by_device[{kind!r}] must be a tuple of dtype names, got {dtypes!r}")
        object.__setattr__(self, "dtypes_by_device", tuple(sorted((k, tuple(v)) for k, v in by_device.items())))
        if self.form not in ("qkv", "layer"):
            raise ValueError(f"Capabilities.form must be 'qkv' or 'layer', got {self.form!r}")

    def closed_on_prefixes(self) -> bool:
        """Whether the gate may check a long case's gradients on a prefix (``bench/execute/case.py``): the
        method's outputs before position P are a function of its per-token inputs before P (and of inputs that
        are not per token: parameters, feature draws) whenever the mask is closed at P, and its own reference
        (if it is gated by one) takes those inputs' prefix and computes the same. Declared by ``prefix_closed``;
        undeclared, True for exact q/k/v methods (gated against exact softmax attention, which is such a
        function) and False for the others: global statistics (k-means centroids, routing over the whole
        sequence, a normaliser over every token) break it, and only the method knows."""
        if self.prefix_closed is not None:
            return bool(self.prefix_closed)
        return self.exact and self.form == "qkv"

    def dtypes_on(self, device_kind: str) -> tuple[str, ...]:
        """The dtypes the method takes on ``device_kind`` (``cpu``, ``cuda``)."""
        return dict(self.dtypes_by_device).get(device_kind, self.dtypes)

    def runs_mask(self, mask_name: str) -> bool:
        return ANY_MASK in self.masks or mask_name in self.masks or self.dense_mask or self.varlen

    def native_mask(self, mask_name: str) -> bool:
        return ANY_MASK in self.masks or mask_name in self.masks

    def declined(self, exc: BaseException) -> str | None:
        """The error's first line when it is one of this backend's declines (``declines``): the case is then
        ``unsupported`` with the backend's own words, in a timed case and in training alike; else None."""
        text = str(exc)
        if self.declines and any(part in text for part in self.declines):
            return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return None


@dataclass
class MethodSpec:
    """A registered method. ``build``: the builder wrapped by :func:`checked_builder` (the options check);
    ``build.__wrapped__`` is the builder as written. ``options``: the ``method_options`` keys the method takes
    (None: not declared, checked only by what the builder reads)."""

    name: str
    build: Callable[[Any], Callable]
    caps: Capabilities
    description: str = ""
    module: str = ""
    options: frozenset[str] | None = None

    def __post_init__(self):
        if self.options is not None:
            if isinstance(self.options, str):
                raise TypeError(f"method {self.name!r}: options must be a collection of names, got {self.options!r}")
            self.options = frozenset(self.options)
        self.build = checked_builder(self.build, self.name, self.options)

    def unknown_options(self, given) -> list[str]:
        """The keys of ``given`` (a method's ``method_options``) outside the declared options (none if undeclared)."""
        if self.options is None:
            return []
        return sorted((key for key in given if key not in self.options), key=str)

    def availability(self) -> tuple[bool, str]:
        """(available, why not): a method whose required modules don't import is listed, never run."""
        for module in self.caps.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return False, f"needs module {module!r}, not importable here"
        return True, ""


METHODS: dict[str, MethodSpec] = {}


def raw_builder(build):
    """The builder as written, under any :func:`checked_builder` wrapping."""
    while getattr(build, "__options_checked__", False):
        build = build.__wrapped__
    return build


def checked_builder(build, name: str, options: frozenset[str] | None):
    """``build`` with the options check around it (DESIGN: no silent fallback). Before the builder runs, a
    key of ``ctx.params`` outside the declared ``options`` is :class:`UnknownOption`; after it returns, so is a key
    the builder never read (``ctx.param`` / ``ctx.params``), declared or not: an option the method does not
    consume on this path must be refused by the method itself, or read. A declared method that reads a name it
    does not declare is a registration bug (``RuntimeError``). A builder that raises (``Unsupported``, a bad
    value) raises before the after-check: its own error is the case's reason."""
    build = raw_builder(build)

    @functools.wraps(build)
    def checked(ctx):
        params = getattr(ctx, "params", None)
        if not isinstance(params, OptionReads) or getattr(ctx, "_building", False):
            return build(ctx)  # not a BuildContext, or a builder calling another on the same context
        method = str(getattr(ctx.case, "method", name))
        if options is not None:
            unknown = [key for key in params if key not in options]
            if unknown:
                raise UnknownOption(unknown_option_message(method, unknown, options))
        ctx._building = True
        try:
            built = build(ctx)
        finally:
            ctx._building = False
        if options is not None and not params.read <= options:
            raise RuntimeError(f"method {name!r} reads method_options field(s) "
                               f"{', '.join(sorted(map(str, params.read - options)))} that its registration does "
                               f"not declare (register_method(..., options=...))")
        unread = [key for key in params if key not in params.read]
        if unread and options is None:
            raise UnknownOption(unknown_option_message(method, unread, params.read))
        if unread:  # declared, but this case's path never read it: refused rather than silently unused
            fields = ", ".join(f"method_options.{method}.{key}" for key in sorted(unread, key=str))
            read = ", ".join(sorted(map(str, params.read))) or "none"
            raise UnknownOption(f"{fields}: not used by {method} for this case (the options it read: {read})")
        return built

    checked.__options_checked__ = True
    return checked


def register_method(name: str, caps: Capabilities | None = None, description: str = "",
                    options=None, **cap_fields):
    """Decorator registering ``build(ctx) -> fn`` as method ``name`` with its capabilities. ``options``: the
    names of the ``method_options.<name>`` keys the builder reads (all of them, on every path); a method that
    declares them has misspelt keys refused when the config is planned, before any case runs."""
    if caps is None:
        caps = Capabilities(**cap_fields)
    elif cap_fields:
        caps = dataclasses.replace(caps, **cap_fields)

    def decorate(build):
        if name in METHODS and raw_builder(METHODS[name].build) is not raw_builder(build):
            existing = METHODS[name].module
            if existing != build.__module__:
                raise ValueError(f"method {name!r} is registered twice ({existing} and {build.__module__})")
        doc = description or (build.__doc__ or "").strip().splitlines()[0:1]
        METHODS[name] = MethodSpec(
            name=name,
            build=build,
            caps=caps,
            description=doc if isinstance(doc, str) else (doc[0] if doc else ""),
            module=raw_builder(build).__module__,
            options=options,
        )
        return build

    return decorate


@dataclass
class BuildContext:
    """What a builder gets: the case, the typed mask description, the bound mask (on the case's device),
    the device, the working dtype, the method's own hyper-parameters and the harness options."""

    case: Case  # the point of the grid: shapes, dtype, mode, seed
    mask: MaskInfo  # typed: causal, offset (bottom-right), window, varlen form (documents), params
    bound: Any  # masks.BoundMask, already on ``device``: mask_mod, dense rows, block layouts
    device: Any
    dtype: Any
    options: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # method_options[method]: the method's hyper-parameters
    value_dim: int | None = None  # v's width where it differs from q/k's (a task model's qk_dim); else head_dim

    def __post_init__(self):
        if not isinstance(self.params, OptionReads):  # every key looked up is recorded (the options check)
            self.params = OptionReads(self.params or {})

    @property
    def head_dim_v(self) -> int:
        """The width of v (and of the output): ``case.head_dim`` unless the caller set ``value_dim``. A method
        that makes value-shaped tensors of its own (a second value set, a value-width parameter) sizes them by it."""
        return self.case.head_dim if self.value_dim is None else int(self.value_dim)

    def param(self, name: str, default):
        """A hyper-parameter from ``method_options`` (config), else ``default``. Reading a name is what makes
        it an option of the method: a key given in ``method_options`` and never read is refused."""
        return self.params.get(name, default)
