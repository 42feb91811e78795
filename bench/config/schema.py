"""The sweep config's schema: every key of ``conf/config.yaml`` and of the presets in ``conf/sweep/``, its type
and its default, in one table (``FIELDS``).

``validate_config(cfg)`` checks every field before any work and returns a normalised copy (defaults filled,
one-or-list axes as lists); a bad value or an unknown key raises ``ConfigError`` naming the full dotted path
(``timing.budget_ms``) and what is allowed. What needs the registries or the machine (method and mask
names, heads_q / heads_kv divisibility, devices) is checked by ``plan.build_plan`` right after.

Adding a key is one line in ``FIELDS``: ``Field("section.key", kind, default, "what it is")``; put its default
in ``conf/config.yaml`` (or a preset) too, and read it from the validated config. A key under a new section
(``cp.world_size``) makes ``cp`` a section by itself. Kinds are small functions ``(path, value) -> value``
that raise ``ConfigError``; compose them with ``optional``, ``one_or_list``, ``list_of`` and ``mapping``.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from attnbench.record import schema as row_schema

DTYPES = ("float32", "float16", "bfloat16")
LAYOUTS = ("single",)
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


class ConfigError(ValueError):
    """Invalid sweep input. The message names the field and the allowed values."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field {field!r}: {message}")


Kind = Callable[[str, Any], Any]


# ---- kinds: (path, value) -> normalised value, or ConfigError naming path ---------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(minimum: int = 0, what: str | None = None) -> Kind:
    def check(path, value):
        if not _is_int(value) or value < minimum:
            raise ConfigError(path, f"must be {what or f'an integer >= {minimum}'}, got {value!r}")
        return value

    return check


positive_int = integer(1, "a positive integer")
non_negative_int = integer(0, "a non-negative integer")
MAX_LENGTH = 1 << 31
"""Longest sequence accepted (tokens): visible-pair counts of longer ones overflow the rows' 64-bit integers."""


def length(path, value):
    if not _is_int(value) or not 1 <= value <= MAX_LENGTH:
        raise ConfigError(path, f"must be a positive integer of at most 2**31 tokens, got {value!r}")
    return value


def number(minimum: float = 0.0, integral: bool = False) -> Kind:
    """A finite number >= minimum (``integral``: a whole number, returned as int)."""

    def check(path, value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if integral:
            ok = ok and float(value).is_integer()
        if not ok or value < minimum:
            kind = "an integer" if integral else "a number"
            raise ConfigError(path, f"must be {kind} >= {minimum}, got {value!r}")
        return int(value) if integral else value

    return check


def boolean(path, value):
    if not isinstance(value, bool):
        raise ConfigError(path, f"must be true or false, got {value!r}")
    return value


def text(path, value):
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"must be a non-empty string, got {value!r}")
    return value


def folder(path, value):
    """A folder path (a number from the command line, results_dir=2025, is its text)."""
    if _is_int(value):
        value = str(value)
    return text(path, value)


def anything(path, value):
    return value


def choice(*allowed: str) -> Kind:
    def check(path, value):
        if value not in allowed:
            raise ConfigError(path, f"{value!r} is not one of: {', '.join(allowed)}")
        return value

    return check


def optional(kind: Kind) -> Kind:
    """``null`` or ``kind``."""
    return lambda path, value: None if value is None else kind(path, value)


def one_or_list(kind: Kind, what: str, allow_empty: bool = False) -> Kind:
    """One value or a list of them; normalised to a list. Item errors name the field and say ``what``."""

    def check(path, value):
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values and not allow_empty:
            raise ConfigError(path, "is an empty list; give at least one value")
        out = []
        for item in values:
            try:
                out.append(kind(path, item))
            except ConfigError:
                raise ConfigError(path, f"must be {what} (one or a list), got {item!r}") from None
        return out

    return check


def list_of(kind: Kind, what: str) -> Kind:
    """A list (``null`` is an empty list); a single value is refused."""

    def check(path, value):
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list of {what}, got {value!r}")
        return [kind(f"{path}[{index}]", item) for index, item in enumerate(value)]

    return check


def _cp_layouts() -> tuple[str, ...]:
    from attnbench.cp.layouts import LAYOUT_NAMES

    return LAYOUT_NAMES


def _cp_balances() -> tuple[str, ...]:
    from attnbench.cp.shard import BALANCES

    return BALANCES


def tolerance_value(path, value):
    """A gate tolerance: a positive number (output and gradients) or [out, grads]."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)):
        return [float(v) for v in value]
    raise ConfigError(path, f"must be a positive number or [out, grads] of two positive numbers, got {value!r}")


def mapping(key: Kind = text, value: Kind = anything, what: str = "a mapping") -> Kind:
    """A mapping (``null`` is empty); each key checked by ``key``, each value by ``value`` at ``path.KEY``."""

    def check(path, given):
        if given is None:
            return {}
        if not isinstance(given, dict):
            raise ConfigError(path, f"must be {what}, got {given!r}")
        return {key(path, k): value(f"{path}.{k}", v) for k, v in given.items()}

    return check


def run_name(path, value):
    """A plain folder name: letters, digits, '.', '_', '-'; not '.' or '..' (nothing outside results_dir)."""
    if _is_int(value) and value >= 0:  # run_id=20250101 arrives from the command line as an integer
        value = str(value)
    if not isinstance(value, str) or not RUN_NAME.fullmatch(value) or value in (".", ".."):
        raise ConfigError(path, f"must be a plain folder name (letters, digits, '.', '_', '-'; not '.' or '..'), "
                                f"got {value!r}")
    return value


def device_name(path, value):
    if value in ("auto", "cpu", "cuda") or (isinstance(value, str) and re.fullmatch(r"cuda:\d+", value)):
        return value
    raise ConfigError(path, f"{value!r} is not one of: auto, cpu, cuda, cuda:N")


def length_pair(path, value):
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(x) and 0 < x <= MAX_LENGTH
                                                                         for x in value)):
        raise ConfigError(path.rsplit("[", 1)[0], f"entry {path.rsplit('[', 1)[-1].rstrip(']')} must be "
                                                  f"[seq_q, seq_kv] positive integers (at most 2**31), got {value!r}")
    return [int(value[0]), int(value[1])]


def power_of_two(minimum: int) -> Kind:
    def check(path, value):
        if not _is_int(value) or value < minimum or value & (value - 1):
            raise ConfigError(path, f"must be a power of two >= {minimum}, got {value!r}")
        return value

    return check


FAILURES = tuple(s for s in row_schema.STATUSES if s != "ok")
positive_ints = one_or_list(positive_int, "positive integers")


def mask_entry(path, value):
    if (isinstance(value, str) and value) or isinstance(value, dict):
        return value
    raise ConfigError(path, f"must be a mask name, 'name(key=value,...)' or a mapping with a 'name' key, "
                            f"got {value!r}")


# ---- the table -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    path: str  # dotted: "timing.budget_ms"
    kind: Kind
    default: Any
    doc: str


FIELDS: dict[str, Field] = {f.path: f for f in [
    # the run
    Field("run_id", optional(run_name), None, "folder name under results_dir; the same run_id again resumes"),
    Field("results_dir", folder, "results", "folder of run folders"),
    Field("plugins", one_or_list(text, "module names or .py paths", allow_empty=True), [],
          "modules (or .py paths) that register methods or masks before planning"),
    Field("device", device_name, "auto", "auto | cpu | cuda | cuda:N"),
    Field("retry", one_or_list(choice(*FAILURES), f"statuses among {', '.join(FAILURES)}", allow_empty=True), [],
          "on resume, re-run cases whose rows have these statuses"),
    Field("case_timeout_s", number(1), 300, "a case past this is killed and recorded as timeout"),
    Field("calibrate", boolean, True, "measure bf16 matmul and copy ceilings once per GPU"),
    # the grid
    Field("methods", one_or_list(text, "method names, or all"), "all", "registered method names, or all"),
    Field("masks", one_or_list(mask_entry, "mask names, 'name(key=value,...)' or mappings (no empty entry)"),
          ["full", "causal"],
          "mask specs"),
    Field("mask", optional(mapping(what="a mask preset mapping with a 'name' key")), None,
          "one mask preset (+mask=NAME, conf/mask/), run alone"),
    Field("seq_lens", one_or_list(length, "positive integers of at most 2**31", allow_empty=True), [1024],
          "self-attention lengths (may be empty when cross_lens is given)"),
    Field("cross_lens", list_of(length_pair, "[seq_q, seq_kv] pairs"), [], "[[seq_q, seq_kv], ...] cross pairs"),
    Field("batch", optional(one_or_list(optional(positive_int), "positive integers")), None,
          "batch size(s); null: from tokens"),
    Field("tokens", optional(positive_int), None,
          "batch = max(1, tokens // seq) when batch is null; lengths above tokens run batch 1 (noted at planning)"),
    Field("heads_q", positive_ints, [8], "query heads"),
    Field("heads_kv", optional(one_or_list(optional(positive_int), "positive integers")), None,
          "key/value heads (GQA); null: heads_q"),
    Field("head_dim", positive_ints, [64], "head dimension(s)"),
    Field("dtype", one_or_list(choice(*DTYPES), ", ".join(DTYPES)), ["float32"], "working dtype(s)"),
    Field("modes", one_or_list(choice(*row_schema.MODES), ", ".join(row_schema.MODES)), ["fwd"], "modes"),
    Field("layout", one_or_list(choice(*LAYOUTS), ", ".join(LAYOUTS)), ["single"], "GPU layouts"),
    Field("decode_queries", length, 1, "queries per decode step"),
    # context parallelism (values checked by attnbench.cp.plan.layout_axis, which names the field)
    Field("layouts", one_or_list(choice(*_cp_layouts()), "layout names"), ["single"],
          "single | ring | ring_allgather | ulysses | usp | torch_cp (adapters where importable)"),
    Field("cp", positive_ints, [2], "world sizes of the CP layouts"),
    Field("cp_balance", one_or_list(choice(*_cp_balances()), "balancers"), ["contiguous"],
          "contiguous | zigzag | per_document"),
    Field("cp_ulysses", optional(one_or_list(non_negative_int, "Ulysses degrees")), None,
          "usp: ranks per Ulysses group; null = automatic"),
    Field("seed", non_negative_int, 0, "input seed"),
    Field("method_options", mapping(text, mapping(what="a mapping {param: value}"),
                                    what="a mapping {method: {param: value}}"), {},
          "per-method hyper-parameters {method_name: {param: value}}"),
    # budgets and method settings
    Field("dense_mask_budget_mb", number(1), 16384, "dense-mask methods refuse masks larger than this"),
    Field("materialize_budget_mb", number(1), 32768, "materialising methods refuse score matrices larger than this"),
    Field("flex_block_size", power_of_two(16), 128, "FlexAttention BlockMask block size"),
    # the correctness gate
    Field("correctness.ref_chunk_mb", number(1), 512, "memory per chunk of the fp32 reference"),
    Field("correctness.tolerance", mapping(choice(*DTYPES), tolerance_value, what="a mapping {dtype: tol or [out, grads]}"),
          {}, "per-dtype gate tolerance (number, or [out, grads]); default bench/measure/gate.py TOLERANCE"),
    Field("correctness.ref_full_pairs", number(1, integral=True), 2**32,
          "above seq_q*seq_kv pairs the gate checks a strided sample of query rows (forward only) and, where the "
          "mask and method allow it, the gradients on a prefix of P tokens, P*P <= ref_full_pairs"),
    Field("correctness.grad_prefix_min", number(1, integral=True), 1024,
          "the shortest prefix the gradients of a case above ref_full_pairs are gated on (shorter: not gated)"),
    # timing
    Field("timing.budget_ms", number(1), 300.0, "time budget of the repetitions"),
    Field("timing.warmup_ms", number(0), 50.0, "warm-up time"),
    Field("timing.min_reps", number(1, integral=True), 5, "fewest repetitions"),
    Field("timing.max_reps", number(1, integral=True), 1000, "most repetitions"),
    Field("timing.flush_l2", boolean, True, "flush the L2 cache before each repetition"),
    Field("timing.long_call_ms", number(0), 1000.0,
          "a call at least this long (ms) is not warmed up apart: its first timed call is the first repetition "
          "(row flag first_call_as_sample); 0: off"),
    Field("timing.cuda_graph", boolean, False, "replay a CUDA graph (forward modes)"),
    Field("timing.telemetry", boolean, True, "read NVML telemetry"),
    Field("timing.energy_window_ms", number(1), 250.0, "back-to-back calls for the energy reading"),
    Field("timing.profile_calls", number(0, integral=True), 0,
          "after timing, calls run under torch.profiler: the row's profile_* columns (bench/measure/profile.py)"),
]}

SECTIONS = tuple(dict.fromkeys(path.split(".", 1)[0] for path in FIELDS if "." in path))


def _unknown(path: str, key: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(path, f"unknown key{hint} allowed here: {', '.join(allowed)}")


def check_keys(cfg: dict) -> None:
    """Refuse keys the schema does not list, naming the first one by its dotted path."""
    top = [p.split(".", 1)[0] for p in FIELDS]
    top = list(dict.fromkeys(top))
    for key, value in cfg.items():
        if key not in top:
            raise _unknown(str(key), str(key), top)
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(key, f"must be a mapping of {', '.join(section_keys(key))}, got {value!r}")
            inner = section_keys(key)
            for sub in value:
                if sub not in inner:
                    raise _unknown(f"{key}.{sub}", str(sub), inner)


def section_keys(section: str) -> list[str]:
    return [p.split(".", 1)[1] for p in FIELDS if p.startswith(section + ".")]


def _get(cfg: dict, path: str, default):
    node = cfg
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.get(part) or {}
    return node.get(parts[-1], default)


def _validated(cfg: dict, paths) -> dict:
    out: dict = {}
    for path in paths:
        field = FIELDS[path]
        value = field.kind(path, _get(cfg, path, field.default))
        node = out
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def validate_config(cfg: dict) -> dict:
    """Every field checked; a normalised copy with defaults filled (sections as nested dicts)."""
    if not isinstance(cfg, dict):
        raise ConfigError("<config>", f"must be a mapping, got {type(cfg).__name__}")
    check_keys(cfg)
    out = _validated(cfg, FIELDS)
    _check_timing(out["timing"])
    if not out["seq_lens"] and not out["cross_lens"]:
        raise ConfigError("seq_lens", "is empty and so is cross_lens; give self lengths, cross pairs, or both")
    if out["methods"] != ["all"] and "all" in out["methods"]:
        raise ConfigError("methods", "'all' stands alone; give all or a list of method names")
    return out


def _check_timing(timing: dict) -> None:
    if timing["min_reps"] > timing["max_reps"]:
        raise ConfigError("timing.min_reps", f"{timing['min_reps']} exceeds timing.max_reps={timing['max_reps']}")


def validate_section(cfg: dict, section: str) -> dict:
    """One validated section (``timing``, ``correctness``) of ``cfg``, defaults filled."""
    check_keys({section: cfg.get(section)})
    out = _validated(cfg, [p for p in FIELDS if p.startswith(section + ".")])[section]
    if section == "timing":
        _check_timing(out)
    return out


def describe_fields() -> str:
    """Every key with its default and meaning (``attnbench --help``)."""
    width = max(len(p) for p in FIELDS)
    return "\n".join(f"  {p:{width}s}  {f.default!r:20s}  {f.doc}" for p, f in FIELDS.items())


__all__ = ["ConfigError", "DTYPES", "FIELDS", "Field", "LAYOUTS", "SECTIONS", "check_keys", "describe_fields",
           "validate_config", "validate_section"]
