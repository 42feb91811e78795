"""The report's pure maths: where two curves cross (CAB's efficiency length), the Pareto front, and the
log-log slope of a curve (its scaling exponent)."""
from __future__ import annotations

from dataclasses import dataclass

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


# ------------------------------------------------------------------------------------------- scaling slopes
SLOPE_FIT_FROM = 16384  # tokens: the default shortest length of a slope fit (shorter ones are launch-bound)
SLOPE_MIN_POINTS = 3  # a line through two points is not a fit: no slope from fewer distinct lengths


def loglog_slope(lengths, values, min_points: int = SLOPE_MIN_POINTS) -> float | None:
    """Least-squares slope of log(value) on log(length): the exponent k of value ~ length^k.

    ``lengths``, ``values``: equal-length sequences; pairs where either is NaN or not positive were not measured
    and are left out. Returns None when fewer than ``min_points`` distinct lengths remain (repeated lengths
    count once towards that minimum, but every point enters the fit).
    """
    length, value = (np.asarray(a, dtype=float) for a in (lengths, values))
    if length.shape != value.shape:
        raise ValueError(f"lengths and values differ in size: {length.shape} vs {value.shape}")
    valid = np.isfinite(length) & np.isfinite(value) & (length > 0) & (value > 0)
    if len(np.unique(length[valid])) < max(min_points, 2):
        return None
    log_length, log_value = np.log(length[valid]), np.log(value[valid])
    centred = log_length - log_length.mean()
    return float((centred * (log_value - log_value.mean())).sum() / (centred ** 2).sum())


@dataclass(frozen=True)
class SlopeFit:
    """A scaling fit: ``slope`` (None when not fitted, ``reason`` then says why) over ``lengths`` (tokens,
    ascending: the lengths that entered the fit; when none did, the measured ones)."""

    slope: float | None
    lengths: tuple[float, ...]
    reason: str = ""


def scaling_fit(lengths, values, fit_from: float = SLOPE_FIT_FROM,
                min_points: int = SLOPE_MIN_POINTS) -> SlopeFit:
    """The log-log slope of ``values`` against ``lengths`` at long lengths.

    Points: the measured pairs (finite, positive; one value per length: repeated lengths raise ValueError).
    Fitted: the lengths >= ``fit_from`` when there are at least ``min_points`` of them, else the longest
    ``min_points`` measured lengths; no slope (with the reason) when fewer than ``min_points`` were measured.
    """
    length, value = (np.asarray(a, dtype=float) for a in (lengths, values))
    valid = np.isfinite(length) & np.isfinite(value) & (length > 0) & (value > 0)
    length, value = length[valid], value[valid]
    if len(np.unique(length)) != len(length):
        raise ValueError(f"lengths: one value per length expected, got repeated lengths in {sorted(length)}")
    order = np.argsort(length)
    length, value = length[order], value[order]
    if len(length) < min_points:
        return SlopeFit(None, tuple(length.tolist()),
                        f"{len(length)} measured length{'s' if len(length) != 1 else ''}, "
                        f"a slope needs {min_points}")
    chosen = length >= fit_from
    if chosen.sum() < min_points:
        chosen = np.arange(len(length)) >= len(length) - min_points
    return SlopeFit(loglog_slope(length[chosen], value[chosen], min_points), tuple(length[chosen].tolist()))
