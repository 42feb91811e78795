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
def mask_facts(mask_label: str, seq_q: int, seq_kv: int) -> tuple[bool, int]:
    """(causal, visible pairs) of a mask at given lengths."""
    from attnbench import masks

    bound = masks.make_mask(mask_label).bind(seq_q, seq_kv)
    return bound.causal, bound.visible_pairs()


@functools.lru_cache(maxsize=256)
def keys_read(mask_label: str, seq_q: int, seq_kv: int) -> int:
    """Key positions that some query sees: what a decode step must read (a windowed cache: the window).
    Evaluates the mask's rows, so use it for few queries (decode) only."""
    from attnbench import masks

    bound = masks.make_mask(mask_label).bind(seq_q, seq_kv)
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
    row.update(
        pattern=pattern_of(causal, case.seq_q, case.seq_kv),
        visible_pairs=pairs,
        density=pairs / float(case.seq_q * case.seq_kv),
        flops=case_flops(case, pairs),
        bytes_moved=case_bytes(case, kv_read),
        device=device_name,
    )
    return row
