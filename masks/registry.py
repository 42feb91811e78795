"""The mask registry: names to spec classes, and the parser of user mask entries.

A mask entry in a config is a name (``causal``), a name with parameters (``sliding_window(window=256)``) or a
mapping (``{name: sliding_window, window: 256}``). ``make_mask`` turns any of them into a validated spec.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, Mapping

from .base import MaskParamError, MaskSpec

MASKS: dict[str, type[MaskSpec]] = {}


def register_mask(cls: type[MaskSpec]) -> type[MaskSpec]:
    """Class decorator: register a ``MaskSpec`` subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in MASKS and MASKS[cls.name] is not cls:
        raise ValueError(f"mask {cls.name!r} is registered twice ({MASKS[cls.name].__name__}, {cls.__name__})")
    MASKS[cls.name] = cls
    return cls


def _parse_call(text: str) -> tuple[str, dict[str, Any]]:
    text = text.strip()
    if "(" not in text:
        return text, {}
    if not text.endswith(")"):
        raise MaskParamError(text, "masks", "expected NAME or NAME(key=value, ...)")
    name, args = text.split("(", 1)
    try:
        call = ast.parse(f"f({args}", mode="eval").body
    except SyntaxError as exc:
        raise MaskParamError(name, "masks", f"cannot parse parameters {args[:-1]!r}: {exc.msg}") from None
    if call.args:
        raise MaskParamError(name, "masks", "parameters must be given as key=value")
    params = {}
    for kw in call.keywords:
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            params[kw.arg] = ast.unparse(kw.value)
    return name.strip(), params


def make_mask(entry: str | Mapping[str, Any] | MaskSpec) -> MaskSpec:
    """Build a validated spec from a config entry; unknown names and fields raise ``MaskParamError``."""
    if isinstance(entry, MaskSpec):
        return entry
    if isinstance(entry, str):
        name, params = _parse_call(entry)
    elif isinstance(entry, Mapping):
        params = dict(entry)
        name = params.pop("name", None)
        if name is None:
            raise MaskParamError("?", "name", f"a mask mapping needs a 'name' key, got keys {sorted(entry)}")
    else:
        raise MaskParamError(str(entry), "masks", f"expected a name or a mapping, got {type(entry).__name__}")
    if name not in MASKS:
        raise MaskParamError(name, "name", f"unknown mask; registered: {', '.join(sorted(MASKS))}")
    cls = MASKS[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    for key in params:
        if key not in allowed:
            raise MaskParamError(name, key, f"unknown parameter; allowed: {', '.join(sorted(allowed)) or 'none'}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise MaskParamError(name, "params", str(exc)) from None


def list_masks() -> list[str]:
    return sorted(MASKS)
