"""Rows from cases: the columns known before anything runs (pattern, exact FLOPs, bytes), one place for all.

FLOPs follow DESIGN.md §5: fwd = 4 * batch * heads_q * visible_pairs * head_dim (Dv = D), bwd = 2.5 x fwd,
fwd_bwd = 3.5 x fwd, decode = fwd. ``visible_pairs`` is the mask's exact count, never a dense estimate.
"""
from __future__ import annotations

import functools

from attnbench.record import schema as schema
from attnbench.config.plan import DTYPE_BYTES, Case, pattern_of

MODE_FLOP_FACTOR = {"fwd": 1.0, "decode": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def fwd_flops(case: Case, visible_pairs: int) -> float:
    """4 * pairs * heads_q * head_dim per batch element (2 for QK^T, 2 for PV)."""
    return 4.0 * case.batch * case.heads_q * visible_pairs * case.head_dim


def case_flops(case: Case, visible_pairs: int) -> float:
    return MODE_FLOP_FACTOR[case.mode] * fwd_flops(case, visible_pairs)


def case_bytes(case: Case, kv_read: int | None = None) -> float:
    """Fewest bytes one call must move: each input read once, each output written once. ``kv_read``: the key
    positions some query sees (decode with a window reads only those); default all ``seq_kv``."""
    elem = DTYPE_BYTES[case.dtype]
    q_like = case.batch * case.heads_q * case.seq_q * case.head_dim * elem
    kv_like = case.batch * case.heads_kv * (case.seq_kv if kv_read is None else kv_read) * case.head_dim * elem
    fwd = 2 * q_like + 2 * kv_like  # q, k, v in; out
    bwd = 4 * q_like + 4 * kv_like  # q, k, v, out, dout in; dq, dk, dv out
    return {"fwd": fwd, "decode": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[case.mode]


@functools.lru_cache(maxsize=256)
def mask_facts(mask_label: str, seq_q: int, seq_kv: int) -> tuple[bool, int | None]:
    """(causal, visible pairs) of a mask at given lengths; pairs None (not counted) where counting would exceed
    the planner's size bounds (such a case is refused, ``plan.mask_size_problem``)."""
    from attnbench import masks
    from attnbench.config.plan import mask_size_problem

    spec = masks.make_mask(mask_label)
    if mask_size_problem(spec, seq_q, seq_kv):
        return spec.causal, None
    bound = spec.bind(seq_q, seq_kv)
    return bound.causal, bound.visible_pairs()


@functools.lru_cache(maxsize=256)
def keys_read(mask_label: str, seq_q: int, seq_kv: int) -> int | None:
    """Key positions that some query sees: what a decode step must read (a windowed cache: the window).
    Full and causal masks in O(1); others evaluate the mask's rows (few queries: decode), None past the bound."""
    from attnbench import masks
    from attnbench.config.plan import MAX_ROWS, mask_size_problem
    from attnbench.masks.basic import BoundCausal, BoundFull

    spec = masks.make_mask(mask_label)
    if spec.bound_cls is BoundFull:
        return seq_kv
    if spec.bound_cls is BoundCausal:  # the last query sees the most: keys up to its aligned position
        bound = spec.bind(seq_q, seq_kv)
        return max(0, min(seq_kv, seq_q + bound.offset))
    if seq_q * seq_kv > MAX_ROWS or mask_size_problem(spec, seq_q, seq_kv):
        return None
    bound = spec.bind(seq_q, seq_kv)
    return int(bound.dense_rows(0, seq_q).any(dim=0).sum())


def base_row(case: Case, run_id: str = "") -> dict:
    row = schema.empty_row()
    row.update({f: getattr(case, f) for f in schema.KEY_FIELDS})
    row.update(run_id=run_id, case_id=case.case_id, mask_name=case.mask_name)
    return row


def describe(case: Case, run_id: str = "", device_name: str | None = None) -> dict:
    """A row with every column that does not need the case to run."""
    from attnbench.methods import METHODS

    row = base_row(case, run_id)
    method = METHODS.get(case.method)
    if method is not None:
        row.update(family=method.caps.family, exact=method.caps.exact)
    causal, pairs = mask_facts(case.mask, case.seq_q, case.seq_kv)
    kv_read = keys_read(case.mask, case.seq_q, case.seq_kv) if case.mode == "decode" else None
    row.update(pattern=pattern_of(causal, case.seq_q, case.seq_kv), device=device_name)
    if pairs is not None:  # not counted past the size bounds: left empty, never estimated
        row.update(visible_pairs=pairs, density=pairs / float(case.seq_q * case.seq_kv), flops=case_flops(case, pairs))
    if case.mode != "decode" or kv_read is not None:
        row["bytes_moved"] = case_bytes(case, kv_read)
    return row
