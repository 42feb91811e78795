"""The report's pure maths: where two curves cross (CAB's efficiency length) and the Pareto front."""
from __future__ import annotations

import numpy as np


def efficiency_length(seq, t_method, t_baseline) -> float | None:
    """Length (tokens) at which the method's curve first crosses the baseline's from above, else None.

    ``seq``, ``t_method``, ``t_baseline``: equal-length sequences (time in any unit, or memory); entries that are
    NaN or not positive were not measured and are skipped. The curves are interpolated piecewise-linearly in
    log(value) against log(length) between measured lengths, so the crossing lies between the two measured
    lengths that bracket the change of sign of log(t_method / t_baseline). Returns None when the method is not
    above the baseline at some length and at or below it at a longer one ("never within the measured range").
    """
    seq, method, base = (np.asarray(a, dtype=float) for a in (seq, t_method, t_baseline))
    valid = np.isfinite(seq) & np.isfinite(method) & np.isfinite(base) & (seq > 0) & (method > 0) & (base > 0)
    order = np.argsort(seq[valid])
    log_seq = np.log(seq[valid][order])
    gap = np.log(method[valid][order]) - np.log(base[valid][order])
    for i in range(len(gap) - 1):
        if gap[i] > 0 >= gap[i + 1]:
            share = gap[i] / (gap[i] - gap[i + 1])
            return float(np.exp(log_seq[i] + share * (log_seq[i + 1] - log_seq[i])))
    return None


def describe_crossing(seq, t_method, t_baseline, better: str, worse: str) -> str:
    """Words for the efficiency length: "6,144 tokens", or "never within the measured range (...)"."""
    seq, method, base = (np.asarray(a, dtype=float) for a in (seq, t_method, t_baseline))
    valid = np.isfinite(method) & np.isfinite(base) & (method > 0) & (base > 0)
    if valid.sum() < 2:
        return "fewer than 2 lengths measured for both"
    crossing = efficiency_length(seq, method, base)
    if crossing is not None:
        return f"{crossing:,.0f} tokens"
    gap = np.log(method[valid]) - np.log(base[valid])
    if (gap <= 0).all():
        return f"never within the measured range ({better} at every measured length)"
    if (gap > 0).all():
        return f"never within the measured range ({worse} at every measured length)"
    return f"never within the measured range ({better} at short lengths only)"


def pareto_front(x, y, higher_is_better: bool) -> np.ndarray:
    """Boolean mask of points not dominated: no other point is both faster (lower x) and better in y."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    y = y if higher_is_better else -y
    order = np.lexsort((-y, x))
    front = np.zeros(len(x), dtype=bool)
    best = -np.inf
    for i in order:
        if y[i] > best:
            front[i] = True
            best = y[i]
    return front
