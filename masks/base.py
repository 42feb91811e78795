"""Mask specs and the representations every method needs.

A *spec* (``MaskSpec``) holds a mask's parameters and is validated on construction, before any work.
Binding it to lengths (``spec.bind(seq_q, seq_kv)``) gives a ``BoundMask``: the mask for one case, with
every representation a method may need:

* ``mask_mod(b, h, q_idx, kv_idx)`` — FlexAttention's predicate, written with broadcasting torch ops so the
  same function also evaluates whole row blocks at once;
* ``dense()`` / ``dense_rows()`` — boolean ``[Sq, Skv]`` tensors (``dense`` refuses above a byte budget);
* ``block_counts()`` — visible pairs per (q-block, kv-block) tile, the exact basis of the block forms;
* ``block_layout()`` — per q-block the kv-blocks, split into partial and full blocks (FlexAttention's layout);
* ``block_mask()`` — a FlexAttention ``BlockMask`` built from the block layout;
* ``varlen()`` — ``cu_seqlens`` and window sizes where FA-style varlen kernels can run the mask natively;
* ``visible_pairs()`` — the exact count of visible (q, kv) pairs, the FLOP basis, in O(Sq) memory at most;
* ``pairs_past_prefix(P)`` / ``prefix_corner(P)`` — does any query before ``P`` see a key at or after ``P``, and the
  ``P x P`` corner as a mask of its own (the correctness gate's backward on long cases).

Masks are the same for every batch element and head (``b`` and ``h`` are accepted and ignored), so the
FLOP basis of a case is ``batch * heads_q * visible_pairs()``. Query ``i`` and key ``j`` are token indices
of their own sequences; alignment of causal masks for ``seq_q != seq_kv`` is a parameter of the spec.

The generic implementations here evaluate ``mask_mod`` in row chunks (O(Sq * Skv) time, bounded memory) on
the mask's device; ``masks.families`` has the closed forms most masks use instead.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch


class MaskParamError(ValueError):
    """A mask parameter is invalid. The message names the field and what is allowed."""

    def __init__(self, mask: str, field: str, message: str):
        self.mask, self.field = mask, field
        super().__init__(f"mask {mask!r}: field {field!r}: {message}")


class MaskTooLarge(MemoryError):
    """A dense representation would exceed its byte budget; ``needed_bytes`` says how much it would take."""

    def __init__(self, what: str, needed_bytes: int, budget_bytes: int):
        self.needed_bytes, self.budget_bytes = needed_bytes, budget_bytes
        super().__init__(
            f"{what} would need {needed_bytes / 2**20:.1f} MiB, over the budget of {budget_bytes / 2**20:.1f} MiB"
        )


@dataclass(frozen=True)
class BlockLayout:
    """FlexAttention-style block sparsity for one (batch, head)-independent mask.

    ``kv_num_blocks[i]`` partial kv-blocks of q-block ``i`` are ``kv_indices[i, :kv_num_blocks[i]]``; the fully
    visible ones are ``full_kv_indices[i, :full_kv_num_blocks[i]]``. A block listed nowhere is fully masked.
    A ragged last block (past the sequence end) is full when every pair inside the sequences is visible.
    All tensors are int32 on the mask's device; index rows are ascending and padded with zeros past their count.
    """

    block_q: int
    block_kv: int
    kv_num_blocks: torch.Tensor  # [nq]
    kv_indices: torch.Tensor  # [nq, nkv]
    full_kv_num_blocks: torch.Tensor  # [nq]
    full_kv_indices: torch.Tensor  # [nq, nkv]

    @property
    def num_q_blocks(self) -> int:
        return int(self.kv_num_blocks.shape[0])

    @property
    def num_kv_blocks(self) -> int:
        return int(self.kv_indices.shape[1])

    def computed_blocks(self) -> int:
        """Blocks a block-sparse kernel must compute (partial + full)."""
        return int(self.kv_num_blocks.sum() + self.full_kv_num_blocks.sum())


@dataclass(frozen=True)
class VarlenForm:
    """A mask expressed the way FA-style varlen kernels take it (``flash_attn_varlen_func``).

    Sequences are packed end to end; ``cu_seqlens_*`` are int32 prefix sums of segment lengths. Inside each
    segment attention is ``causal`` (bottom-right aligned, as flash-attn does) or not, limited to the window
    ``(left, right)``; ``-1`` means unbounded. No query sees a key of another segment.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    window: tuple[int, int] = (-1, -1)


ROW_CHUNK_ELEMENTS = 1 << 24
"""Elements of one row chunk the generic evaluators materialise at a time (16 Mi bools = 16 MiB)."""
PREFIX_CHECK_PAIRS = 1 << 36
"""Most (query, key) pairs ``BoundMask.pairs_past_prefix`` evaluates through a generic ``mask_mod``."""


def _row_chunk(seq_kv: int, budget_elems: int = ROW_CHUNK_ELEMENTS) -> int:
    return max(1, budget_elems // max(1, seq_kv))


def block_extents(length: int, block: int, device=None) -> torch.Tensor:
    """Tokens in each block of ``block`` tokens covering ``length`` (the last one may be ragged), int64."""
    starts = torch.arange(0, length, block, device=device)
    return (starts + block).clamp(max=length) - starts


def block_edges(length: int, block: int, device=None) -> torch.Tensor:
    """Block boundaries ``0, block, 2*block, ..., length`` (``ceil(length / block) + 1`` values), int64."""
    return (torch.arange(0, math.ceil(length / block) + 1, device=device) * block).clamp(max=length)


class BoundMask:
    """A mask spec bound to (seq_q, seq_kv). Subclasses override ``mask_mod`` and may override any
    representation with a closed form (the generic versions evaluate ``mask_mod`` in row chunks)."""

    def __init__(self, spec: "MaskSpec", seq_q: int, seq_kv: int):
        self.spec, self.seq_q, self.seq_kv = spec, int(seq_q), int(seq_kv)
        self.device = torch.device("cpu")

    # ---- the predicate -------------------------------------------------------------------------------
    def mask_mod(self, b, h, q_idx, kv_idx):  # pragma: no cover - abstract
        raise NotImplementedError

    def to(self, device) -> "BoundMask":
        """This mask with every captured tensor on ``device`` (for mask_mods evaluated there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        for key, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                clone.__dict__[key] = value.to(device)
        clone.device = device
        return clone

    # ---- dense forms ---------------------------------------------------------------------------------
    def dense_rows(self, q_start: int, q_end: int, device=None) -> torch.Tensor:
        """Boolean ``[q_end - q_start, seq_kv]`` rows of the mask (True = visible)."""
        device = torch.device(device) if device is not None else self.device
        return self.visible_rows(torch.arange(q_start, q_end, device=device), device=device)

    def visible_rows(self, rows: torch.Tensor, kv_start: int = 0, kv_end: int | None = None,
                     device=None) -> torch.Tensor:
        """Boolean ``[len(rows), kv_end - kv_start]``: the mask at the query rows ``rows`` (int64 indices, any
        order) and the keys ``[kv_start, kv_end)`` (default all), from one vectorised ``mask_mod`` call:
        O(rows x keys), for a sample of rows at any length (``dense_rows`` is its contiguous-range case)."""
        device = torch.device(device) if device is not None else self.device
        bound = self.to(device)
        kv_end = self.seq_kv if kv_end is None else kv_end
        q_idx = rows.to(device=device, dtype=torch.int64)[:, None]
        kv_idx = torch.arange(kv_start, kv_end, device=device)[None, :]
        zero = torch.zeros((), dtype=torch.int64, device=device)
        visible = bound.mask_mod(zero, zero, q_idx, kv_idx)
        return visible.expand(q_idx.shape[0], kv_end - kv_start).to(torch.bool)

    def dense_bytes(self) -> int:
        return self.seq_q * self.seq_kv

    def dense(self, device=None, max_bytes: int = 1 << 30) -> torch.Tensor:
        """Boolean ``[seq_q, seq_kv]``; raises ``MaskTooLarge`` (with the size needed) over ``max_bytes``."""
        needed = self.dense_bytes()
        if needed > max_bytes:
            raise MaskTooLarge(f"dense mask {self.label} [{self.seq_q}x{self.seq_kv}]", needed, max_bytes)
        return self.dense_rows(0, self.seq_q, device)

    # ---- counts --------------------------------------------------------------------------------------
    def row_counts(self) -> torch.Tensor:
        """Visible keys per query row, int64 ``[seq_q]`` on the mask's device."""
        out = []
        chunk = _row_chunk(self.seq_kv)
        for start in range(0, self.seq_q, chunk):
            out.append(self.dense_rows(start, min(self.seq_q, start + chunk)).sum(dim=1))
        return torch.cat(out)

    def visible_pairs(self) -> int:
        """Exact number of visible (q, kv) pairs for one batch element and head."""
        return int(self.row_counts().sum())

    def density(self) -> float:
        """``visible_pairs / (seq_q * seq_kv)``, in [0, 1]."""
        return self.visible_pairs() / float(self.seq_q * self.seq_kv)

    # ---- block forms ---------------------------------------------------------------------------------
    def block_counts(self, block_q: int = 128, block_kv: int = 128) -> torch.Tensor:
        """Visible pairs per tile, int64 ``[ceil(Sq / block_q), ceil(Skv / block_kv)]``.

        Generic: sums ``dense_rows`` one chunk of whole q-blocks at a time, on the mask's device.
        """
        nkv = math.ceil(self.seq_kv / block_kv)
        pad_kv = nkv * block_kv - self.seq_kv
        rows_per_chunk = max(1, _row_chunk(self.seq_kv) // block_q) * block_q
        out = []
        for start in range(0, self.seq_q, rows_per_chunk):
            end = min(self.seq_q, start + rows_per_chunk)
            nrow_blocks = math.ceil((end - start) / block_q)
            pad_q = nrow_blocks * block_q - (end - start)
            rows = torch.nn.functional.pad(self.dense_rows(start, end).to(torch.int32), (0, pad_kv, 0, pad_q))
            out.append(rows.view(nrow_blocks, block_q, nkv, block_kv).sum(dim=(1, 3), dtype=torch.int64))
        return torch.cat(out)

    def block_layout(self, block_q: int = 128, block_kv: int = 128) -> BlockLayout:
        """Partial and full kv-blocks per q-block, exact: a tile is full when every pair inside the sequences
        is visible, partial when some but not all are, and listed nowhere when none is."""
        counts = self.block_counts(block_q, block_kv)
        area = block_extents(self.seq_q, block_q, counts.device)[:, None] * block_extents(
            self.seq_kv, block_kv, counts.device
        )[None, :]
        full = counts == area
        partial = (counts > 0) & ~full
        return layout_from_block_flags(partial, full, block_q, block_kv)

    def block_mask(self, device="cpu", block_size: int = 128):
        """A FlexAttention ``BlockMask`` (batch and head broadcast) for this mask on ``device``, built from
        ``block_layout`` (computed on that device). Build it once per case, outside the timed region."""
        from torch.nn.attention.flex_attention import BlockMask

        bound = self.to(device)
        layout = bound.block_layout(block_size, block_size)
        return BlockMask.from_kv_blocks(
            layout.kv_num_blocks[None, None],
            layout.kv_indices[None, None],
            layout.full_kv_num_blocks[None, None],
            layout.full_kv_indices[None, None],
            BLOCK_SIZE=block_size,
            mask_mod=bound.mask_mod,
            seq_lengths=(self.seq_q, self.seq_kv),
        )

    def varlen(self) -> VarlenForm | None:
        """The varlen form, or None where the mask cannot be expressed that way."""
        return None

    # ---- prefixes (the correctness gate's backward on long cases) -------------------------------------
    def pairs_past_prefix(self, prefix: int, max_pairs: int = PREFIX_CHECK_PAIRS) -> int | None:
        """Visible pairs whose query is before ``prefix`` and whose key is not: 0 when the first ``prefix``
        queries see only the first ``prefix`` keys (the mask is *prefix-closed* at ``prefix``: causal, sliding
        window, causal documents; not full, nor a prefix-LM whose prefix is longer). Read from the mask itself,
        never from its name: from the closed-form tile counts where the mask has them (one row of
        ``prefix x prefix`` tiles, O(Sq + tiles)), else by evaluating ``mask_mod`` over those
        ``prefix x (seq_kv - prefix)`` pairs in row chunks, or None (not checked) when they are more than
        ``max_pairs``."""
        prefix = int(prefix)
        if prefix <= 0 or prefix >= self.seq_kv:
            return 0
        if type(self).block_counts is not BoundMask.block_counts:  # a closed form: O(Sq + tiles)
            return int(self.block_counts(prefix, prefix)[0, 1:].sum())
        rows = min(prefix, self.seq_q)
        if rows * (self.seq_kv - prefix) > max_pairs:
            return None
        chunk = _row_chunk(self.seq_kv - prefix)
        total = 0
        for start in range(0, rows, chunk):
            index = torch.arange(start, min(rows, start + chunk), device=self.device)
            total += int(self.visible_rows(index, prefix, self.seq_kv).sum())
        return total

    def prefix_corner(self, length: int) -> "BoundMask":
        """The mask on the first ``length`` queries and keys (self-attention): the same pairs, as a mask of
        its own ``[length, length]`` (what the reference takes for a prefix of the inputs)."""
        if self.seq_q != self.seq_kv:
            raise ValueError(f"prefix_corner: a self-attention mask only, got {self.seq_q}x{self.seq_kv}")
        if not 0 < int(length) <= self.seq_q:
            raise ValueError(f"prefix_corner: length must be in 1..{self.seq_q}, got {length!r}")
        return PrefixCorner(self, int(length))

    # ---- description -------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def causal(self) -> bool:
        return self.spec.causal

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label} {self.seq_q}x{self.seq_kv}>"


class PrefixCorner(BoundMask):
    """The first ``seq_q`` queries and keys of a self-attention mask ``parent`` (``BoundMask.prefix_corner``):
    its ``mask_mod`` is the parent's, whose pairs below the corner are the same; every other representation is
    the generic one (O(length²), the size of what a reference on the corner computes anyway)."""

    def __init__(self, parent: BoundMask, length: int):
        super().__init__(parent.spec, length, length)
        self.parent = parent
        self.device = parent.device

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.parent.mask_mod(b, h, q_idx, kv_idx)

    def to(self, device) -> "PrefixCorner":
        device = torch.device(device)
        if device == self.device:
            return self
        return PrefixCorner(self.parent.to(device), self.seq_q)

    def __repr__(self) -> str:
        return f"<PrefixCorner {self.seq_q}x{self.seq_kv} of {self.parent!r}>"


def layout_from_block_flags(partial: torch.Tensor, full: torch.Tensor, block_q: int, block_kv: int) -> BlockLayout:
    """Turn boolean ``[nq, nkv]`` partial/full flags into a ``BlockLayout`` (indices ascending)."""

    def compress(flags: torch.Tensor):
        counts = flags.sum(dim=1).to(torch.int32)
        # stable sort puts the True columns first, in ascending order
        order = torch.sort((~flags).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
        cols = torch.arange(flags.shape[1], dtype=torch.int32, device=flags.device)[None, :]
        order = torch.where(cols < counts[:, None], order, torch.zeros_like(order))
        return counts, order

    kv_num, kv_idx = compress(partial)
    full_num, full_idx = compress(full)
    return BlockLayout(block_q, block_kv, kv_num, kv_idx, full_num, full_idx)


# ---- parameter checks -----------------------------------------------------------------------------------
def check_choice(spec: "MaskSpec", field: str, choices: tuple[str, ...]) -> None:
    value = getattr(spec, field)
    if value not in choices:
        raise MaskParamError(spec.name, field, f"must be one of {', '.join(choices)}, got {value!r}")


def check_at_least(spec: "MaskSpec", field: str, low: int | float) -> None:
    value = getattr(spec, field)
    if value < low:
        raise MaskParamError(spec.name, field, f"must be >= {low}, got {value!r}")


def check_fraction(spec: "MaskSpec", field: str, allow_zero: bool) -> None:
    """``field`` in [0, 1] (``allow_zero``) or in (0, 1]."""
    value = getattr(spec, field)
    if not ((0 <= value if allow_zero else 0 < value) and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise MaskParamError(spec.name, field, f"must be in {interval}, got {value!r}")


def _coerce(mask: str, field: str, hint: Any, value: Any) -> Any:
    """``value`` as the field's declared type (lists from YAML become tuples); MaskParamError otherwise."""
    is_bool = isinstance(value, bool)
    if hint is bool:
        if is_bool:
            return value
        raise MaskParamError(mask, field, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not is_bool:
            return value
        raise MaskParamError(mask, field, f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not is_bool and math.isfinite(value):
            return float(value)
        raise MaskParamError(mask, field, f"must be a finite number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise MaskParamError(mask, field, f"must be a string, got {value!r}")
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise MaskParamError(mask, field, f"must be a list, got {value!r}")
        item_hint = typing.get_args(hint)[0]
        return tuple(_coerce(mask, field, item_hint, item) for item in value)
    return value


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class MaskSpec:
    """Base of all mask specs: a frozen dataclass of validated parameters.

    Subclasses set ``name`` (registry key), ``causal``, ``bound_cls``, ``description``, and implement
    ``_validate`` (parameters alone) and ``_validate_lengths``. Field values are coerced to their declared
    types first (``int``, ``float``, ``bool``, ``str``, ``tuple[int, ...]``; lists become tuples), so specs
    are hashable and their labels canonical.

    ``causal`` (for the CAB pattern) is True when no query sees a key after its own aligned position. It is
    a class constant, or, where parameters decide it, a field or a property of the instance: read it from an
    instance. ``supports_cross`` is False for self-attention masks, which need ``seq_q == seq_kv``.
    """

    name: ClassVar[str] = ""
    causal: ClassVar[bool] = False
    supports_cross: ClassVar[bool] = True
    bound_cls: ClassVar[type] = BoundMask
    description: ClassVar[str] = ""

    def __post_init__(self):
        for field, hint in _field_hints(type(self)).items():
            object.__setattr__(self, field, _coerce(self.name, field, hint, getattr(self, field)))
        self._validate()

    def _validate(self) -> None:
        """Check parameters; raise ``MaskParamError`` naming the field."""

    def _validate_lengths(self, seq_q: int, seq_kv: int) -> None:
        """Check parameters against lengths; raise ``MaskParamError`` naming the field."""

    def validate_lengths(self, seq_q: int, seq_kv: int) -> None:
        for field, value in (("seq_q", seq_q), ("seq_kv", seq_kv)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MaskParamError(self.name, field, f"must be a positive integer, got {value!r}")
        if not self.supports_cross and seq_q != seq_kv:
            raise MaskParamError(
                self.name, "seq_kv", f"self-attention mask: seq_kv must equal seq_q, got {seq_kv} != {seq_q}"
            )
        self._validate_lengths(seq_q, seq_kv)

    def bind(self, seq_q: int, seq_kv: int | None = None) -> BoundMask:
        seq_kv = seq_q if seq_kv is None else seq_kv
        self.validate_lengths(seq_q, seq_kv)
        return self.bound_cls(self, seq_q, seq_kv)

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def label(self) -> str:
        """Canonical text: the name, then the parameters that differ from their defaults."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            if value != default:
                if isinstance(value, (list, tuple)):
                    value = "[" + ",".join(str(v) for v in value) + "]"
                parts.append(f"{f.name}={value}")
        return self.name + (f"({','.join(parts)})" if parts else "")


MaskMod = Callable[[Any, Any, Any, Any], Any]
