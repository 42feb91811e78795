"""Planning: validate the sweep config, expand the grid into cases, and decide what each method gets.

Every field is checked before any work; a bad one raises ``ConfigError`` naming the field and what is
allowed. Cases a method cannot run by its declared capabilities become ``unsupported`` rows with reasons
(``Plan.unsupported``); the rest are ``Plan.runnable``, ordered so that cases sharing inputs (and so the
fp32 reference) run back to back.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Iterable

from attnbench.record import schema as schema

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
LAYOUTS = ("single",)


class ConfigError(ValueError):
    """Invalid sweep input. The message names the field and the allowed values."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field {field!r}: {message}")


@dataclass(frozen=True)
class Case:
    """One point of the grid (DESIGN.md §2)."""

    method: str
    mask: str  # canonical label; masks.make_mask(mask) rebuilds the spec
    mask_name: str
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    dtype: str
    mode: str
    layout: str = "single"
    world_size: int = 1
    seed: int = 0
    device: str = "cpu"

    @property
    def case_id(self) -> str:
        key = json.dumps([getattr(self, f) for f in schema.KEY_FIELDS], sort_keys=True)
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    @property
    def needs_grad(self) -> bool:
        return self.mode in ("bwd", "fwd_bwd")

    def input_key(self) -> tuple:
        """Cases with equal keys share inputs and the fp32 reference."""
        return (self.mask, self.batch, self.heads_q, self.heads_kv, self.seq_q, self.seq_kv, self.head_dim,
                self.dtype, self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Case":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def pattern_of(causal: bool, seq_q: int, seq_kv: int) -> str:
    """CAB's pattern name: (non)causal x self/cross (cross when the lengths differ: decode, encoder memory)."""
    kind = "cross" if seq_q != seq_kv else "self"
    return f"{'causal' if causal else 'noncausal'}_{kind}"


@dataclass
class Plan:
    runnable: list[Case]
    unsupported: list[tuple[Case, str]]
    devices: list[str]

    @property
    def total(self) -> int:
        return len(self.runnable) + len(self.unsupported)


# ---- validation helpers ------------------------------------------------------------------------------------
def _as_list(cfg: dict, field: str, default=None) -> list:
    value = cfg.get(field, default)
    if value is None:
        return [None]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(field, "is an empty list; give at least one value")
        return list(value)
    return [value]


def _positive_ints(cfg: dict, field: str, default=None, allow_none=False) -> list:
    values = _as_list(cfg, field, default)
    for value in values:
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(field, f"must be positive integers, got {value!r}")
    return values


def _choices(cfg: dict, field: str, allowed: Iterable[str], default=None) -> list:
    allowed = tuple(allowed)
    values = _as_list(cfg, field, default)
    for value in values:
        if value not in allowed:
            raise ConfigError(field, f"{value!r} is not one of: {', '.join(allowed)}")
    return values


def _number(cfg: dict, field: str, default, minimum=0.0, integer=False):
    value = cfg.get(field, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ConfigError(field, f"must be {kind} >= {minimum}, got {value!r}")
    return int(value) if integer else float(value)


def resolve_methods(cfg: dict) -> list[str]:
    from attnbench.methods import METHODS

    names = _as_list(cfg, "methods", "all")
    if names == ["all"]:
        return sorted(METHODS)
    for name in names:
        if name not in METHODS:
            raise ConfigError("methods", f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return list(dict.fromkeys(names))


def resolve_masks(cfg: dict):
    from attnbench import masks

    entries = _as_list(cfg, "masks", ["full", "causal"])
    preset = cfg.get("mask")
    if preset is not None:  # `+mask=NAME` (conf/mask/NAME.yaml, fields editable as mask.FIELD=...) runs alone
        if not isinstance(preset, dict) or "name" not in preset:
            raise ConfigError("mask", f"expected a mask preset mapping with a 'name' key, got {preset!r}")
        entries = [preset]
    specs = []
    for entry in entries:
        if entry is None:
            raise ConfigError("masks", "contains an empty entry")
        try:
            specs.append(masks.make_mask(entry))
        except masks.MaskParamError as exc:
            raise ConfigError("masks", str(exc)) from None
    return list({spec.label: spec for spec in specs}.values())


def length_pairs(cfg: dict) -> list[tuple[int, int]]:
    """(seq_q, seq_kv) pairs: self lengths from ``seq_lens``, cross pairs from ``cross_lens``."""
    pairs = [(n, n) for n in _positive_ints(cfg, "seq_lens", [1024])]
    for index, pair in enumerate(cfg.get("cross_lens") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in pair)):
            raise ConfigError("cross_lens", f"entry {index} must be [seq_q, seq_kv] positive integers, got {pair!r}")
        pairs.append((int(pair[0]), int(pair[1])))
    return pairs


def validate_timing(cfg: dict) -> dict:
    timing = dict(cfg.get("timing") or {})
    out = {
        "budget_ms": _number(timing, "budget_ms", 300.0, minimum=1.0),
        "warmup_ms": _number(timing, "warmup_ms", 50.0),
        "min_reps": _number(timing, "min_reps", 5, minimum=1, integer=True),
        "max_reps": _number(timing, "max_reps", 1000, minimum=1, integer=True),
        "flush_l2": bool(timing.get("flush_l2", True)),
        "cuda_graph": bool(timing.get("cuda_graph", False)),
        "telemetry": bool(timing.get("telemetry", True)),
    }
    if out["min_reps"] > out["max_reps"]:
        raise ConfigError("timing.min_reps", f"{out['min_reps']} exceeds timing.max_reps={out['max_reps']}")
    unknown = set(timing) - set(out)
    if unknown:
        raise ConfigError("timing", f"unknown keys {sorted(unknown)}; allowed: {', '.join(out)}")
    return out


def resolve_devices(cfg: dict) -> list[str]:
    device = cfg.get("device", "auto")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
    if device == "cpu":
        return ["cpu"]
    if device == "cuda":
        if not gpus:
            raise ConfigError("device", "'cuda' asked for, but no CUDA GPU is visible; use device=cpu or auto")
        return [f"cuda:{i}" for i in range(gpus)]
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        if int(device[5:]) >= gpus:
            raise ConfigError("device", f"{device} asked for, but {gpus} CUDA GPU(s) are visible")
        return [device]
    raise ConfigError("device", f"{device!r} is not one of: auto, cpu, cuda, cuda:N")


# ---- capability filtering ----------------------------------------------------------------------------------
def unsupported_reason(case: Case, spec, caps, available: tuple[bool, str], options: dict) -> str | None:
    """Why ``case`` cannot run by the method's declaration, or None when it can."""
    ok, why = available
    if not ok:
        return f"method unavailable: {why}"
    device_kind = case.device.split(":")[0]
    if device_kind not in caps.devices:
        return f"runs on {', '.join(caps.devices)} only, not {device_kind}"
    if case.dtype not in caps.dtypes:
        return f"dtype {case.dtype} not supported (supports {', '.join(caps.dtypes)})"
    if caps.head_dims is not None and case.head_dim not in caps.head_dims:
        return f"head_dim {case.head_dim} not supported (supports {caps.head_dims})"
    if caps.max_head_dim is not None and case.head_dim > caps.max_head_dim:
        return f"head_dim {case.head_dim} over the maximum {caps.max_head_dim}"
    if case.heads_kv != case.heads_q and not caps.gqa:
        return "no grouped-query attention (heads_kv < heads_q)"
    if case.seq_q != case.seq_kv and not caps.cross:
        return "no cross attention (seq_q != seq_kv)"
    if case.needs_grad and not caps.backward:
        return "no backward pass"
    if case.mode == "decode" and not caps.decode:
        return "no decode mode"
    if not caps.runs_mask(spec.name):
        return f"mask {spec.name} not supported natively and no dense-mask path"
    if not caps.native_mask(spec.name) and not caps.dense_mask and caps.varlen:
        bound = spec.bind(case.seq_q, case.seq_kv)
        if bound.varlen() is None:
            return f"mask {case.mask} has no varlen form, the only non-native path of this method"
    if not caps.native_mask(spec.name) and caps.dense_mask and not caps.varlen:
        needed = case.seq_q * case.seq_kv
        budget = options["dense_mask_bytes"]
        if needed > budget:
            return (f"dense mask would need {needed / 2**20:.0f} MiB, over dense_mask_budget_mb="
                    f"{budget / 2**20:.0f}")
    if caps.materializes:
        # scores and probabilities in the working dtype, and their gradients with backward
        needed = (case.batch * case.heads_q * case.seq_q * case.seq_kv * DTYPE_BYTES[case.dtype]
                  * (4 if case.needs_grad else 2))
        budget = options["materialize_bytes"]
        if needed > budget:
            return (f"materialises the score matrix: ~{needed / 2**30:.1f} GiB, over "
                    f"materialize_budget_mb={budget / 2**20:.0f}")
    return None


def plan_options(cfg: dict) -> dict:
    return {
        "dense_mask_bytes": int(_number(cfg, "dense_mask_budget_mb", 4096, minimum=1) * 2**20),
        "materialize_bytes": int(_number(cfg, "materialize_budget_mb", 32768, minimum=1) * 2**20),
    }


def build_plan(cfg: dict) -> Plan:
    """Validate ``cfg`` (a plain dict) and expand it; raises ``ConfigError`` before any work."""
    from attnbench.methods import METHODS

    method_names = resolve_methods(cfg)
    specs = resolve_masks(cfg)
    pairs = length_pairs(cfg)
    batches = _positive_ints(cfg, "batch", None, allow_none=True)
    tokens = cfg.get("tokens")
    if batches == [None]:
        if tokens is None:
            batches = [1]
        elif isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ConfigError("tokens", f"must be a positive integer (batch = max(1, tokens // seq_q)), got {tokens!r}")
    heads_q = _positive_ints(cfg, "heads_q", [8])
    heads_kv = _positive_ints(cfg, "heads_kv", None, allow_none=True)
    head_dims = _positive_ints(cfg, "head_dim", [64])
    dtypes = _choices(cfg, "dtype", DTYPES, ["float32"])
    modes = _choices(cfg, "modes", schema.MODES, ["fwd"])
    from attnbench.cp import plan as cp_plan  # CP hook: layouts x cp world sizes x cp_balance

    layouts = cp_plan.layout_axis(cfg)
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", f"must be a non-negative integer, got {seed!r}")
    decode_queries = _number(cfg, "decode_queries", 1, minimum=1, integer=True)
    validate_timing(cfg)
    _number(cfg, "case_timeout_s", 300, minimum=1)
    for status in cfg.get("retry") or ():
        if status not in schema.STATUSES or status == "ok":
            raise ConfigError("retry", f"{status!r} is not a failure status; allowed: "
                              f"{', '.join(s for s in schema.STATUSES if s != 'ok')}")
    options = plan_options(cfg)
    for hq, hkv in itertools.product(heads_q, heads_kv):
        if hkv is not None and hq % hkv:
            raise ConfigError("heads_kv", f"{hkv} does not divide heads_q={hq}; heads_q must be a multiple of heads_kv")
    for spec, (sq, skv) in itertools.product(specs, pairs):
        try:
            spec.validate_lengths(sq, skv)
        except ValueError as exc:
            raise ConfigError("masks", f"{exc} (seq_q={sq}, seq_kv={skv})") from None
    if "decode" in modes:
        for spec, (_, skv) in itertools.product(specs, pairs):
            try:
                spec.validate_lengths(decode_queries, skv)
            except ValueError as exc:
                raise ConfigError("decode_queries", f"{exc} (decode: seq_q={decode_queries}, seq_kv={skv})") from None
    cp_plan.validate_lengths(layouts, pairs)
    devices = resolve_devices(cfg)
    device_kind = devices[0]

    runnable, unsupported = [], []
    grid = itertools.product(specs, pairs, batches, heads_q, heads_kv, head_dims, dtypes, modes, layouts)
    for spec, (sq, skv), batch, hq, hkv, dim, dtype, mode, (layout, world_size) in grid:
        if mode == "decode":
            sq = decode_queries
        if batch is None:
            batch = max(1, tokens // max(sq, skv if mode == "decode" else sq))
        for name in method_names:
            case = Case(
                method=name, mask=spec.label, mask_name=spec.name, batch=batch, heads_q=hq,
                heads_kv=hq if hkv is None else hkv, seq_q=sq, seq_kv=skv, head_dim=dim, dtype=dtype,
                mode=mode, layout=layout, world_size=world_size, seed=seed, device=device_kind,
            )
            method = METHODS[name]
            reason = (cp_plan.unsupported_reason(case, spec, devices)
                      or unsupported_reason(case, spec, method.caps, method.availability(), options))
            if reason is None:
                runnable.append(case)
            else:
                unsupported.append((case, reason))
    # dedupe (decode collapses self/cross pairs) and order: small problems first, so an interrupted run still
    # covers every mask and method at the short lengths; shared inputs together; grad modes first
    runnable = list({c.case_id: c for c in runnable}.values())
    unsupported = list({c.case_id: (c, r) for c, r in unsupported}.values())
    mode_rank = {"fwd_bwd": 0, "bwd": 1, "fwd": 2, "decode": 3}
    runnable.sort(key=lambda c: (c.batch * c.seq_q * c.seq_kv, c.input_key(), mode_rank[c.mode], c.method))
    return Plan(runnable=runnable, unsupported=unsupported, devices=devices)

