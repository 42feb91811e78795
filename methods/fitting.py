"""Method options fitted to a case's length: the train config key ``fit_method_options``.

Some methods' size options (a block, a window, a region, a number of landmarks) default to values sized for
long sequences (256 tokens and more); a short training task (16 to 128 tokens) is then shorter than one block,
and the case is ``unsupported`` ("method_options.halo.block: must be <= seq 64, got 256"). With
``fit_method_options: true`` the train planner asks the method's length fit (registered here by the method's
module, beside its builder, with :func:`fits_length`) for values that fit the case's attention lengths, for the
options the config does not set and only when the defaults do not fit. The fitted values are part of the case
(its id, and the row's ``fitted_options`` column): never silent. An option the config sets is never changed:
if it does not fit, the method's own check gives the case its ``unsupported`` reason, as without fitting.

A fit is ``fn(seq_q, seq_kv, causal, given) -> {field: value}``: ``given`` is the config's
``method_options.<method>``; the result holds only fields not in ``given`` (empty: the defaults fit).
"""
from __future__ import annotations

from typing import Callable

LengthFit = Callable[[int, int, bool, dict], dict]
LENGTH_FITS: dict[str, LengthFit] = {}


def fits_length(*methods: str):
    """Register the decorated function as the length fit of ``methods``."""
    def wrap(fn: LengthFit) -> LengthFit:
        for name in methods:
            LENGTH_FITS[name] = fn
        return fn
    return wrap


def pow2_divisor(length: int, at_most: float) -> int:
    """The largest power of two that divides ``length`` and is at most ``at_most`` (at least 1)."""
    value = 1
    while length % (value * 2) == 0 and value * 2 <= at_most:
        value *= 2
    return value


def fitted_options(method: str, seq_q: int, seq_kv: int, causal: bool, given: dict | None) -> dict:
    """The options of ``method`` fitted to these lengths (empty: no fit registered, or the defaults fit)."""
    fit = LENGTH_FITS.get(method)
    if fit is None:
        return {}
    given = dict(given or {})
    fitted = fit(int(seq_q), int(seq_kv), bool(causal), given)
    return {key: value for key, value in fitted.items() if key not in given}
