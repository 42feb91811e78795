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
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from attnbench.config.schema import (DTYPES, FIELDS, LAYOUTS, ConfigError, validate_config,  # noqa: F401
                                     validate_section)
from attnbench.methods.case import Case, pattern_of  # noqa: F401  (the typed case lives beside the methods)
from attnbench.record import schema as schema

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Plan:
    runnable: list[Case]
    unsupported: list[tuple[Case, str]]
    devices: list[str]
    notes: list[str] = dataclass_field(default_factory=list)  # what the planner decided that the user should know

    @property
    def total(self) -> int:
        return len(self.runnable) + len(self.unsupported)


# ---- validation (types and unknown keys: config/schema.py; names, divisibility, devices: here) ---------------
def resolve_methods(cfg: dict) -> list[str]:
    from attnbench.methods import METHODS

    names = cfg["methods"] if "methods" in cfg else FIELDS["methods"].kind("methods", "all")
    if names == ["all"]:
        return sorted(METHODS)
    for name in names:
        if name not in METHODS:
            raise ConfigError("methods", f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return list(dict.fromkeys(names))


def resolve_masks(cfg: dict):
    from attnbench import masks

    entries = cfg["masks"]
    preset = cfg.get("mask")
    if preset is not None:  # `+mask=NAME` (conf/mask/NAME.yaml, fields editable as mask.FIELD=...) runs alone
        if not isinstance(preset, dict) or "name" not in preset:
            raise ConfigError("mask", f"expected a mask preset mapping with a 'name' key, got {preset!r}")
        entries = [preset]
    specs = []
    for entry in entries:
        try:
            specs.append(masks.make_mask(entry))
        except masks.MaskParamError as exc:
            raise ConfigError("mask" if preset is not None else "masks", str(exc)) from None
    return list({spec.label: spec for spec in specs}.values())


def length_pairs(cfg: dict) -> list[tuple[int, int]]:
    """(seq_q, seq_kv) pairs: self lengths from ``seq_lens``, cross pairs from ``cross_lens`` (validated cfg)."""
    return [(n, n) for n in cfg["seq_lens"]] + [(int(q), int(kv)) for q, kv in cfg["cross_lens"]]


def validate_timing(cfg: dict) -> dict:
    """The ``timing`` section, validated, defaults filled."""
    return validate_section(cfg, "timing")


def check_method_options(cfg: dict) -> None:
    """``method_options``: {registered method: {param: value}} (types checked by the schema); a key that the
    method's registration does not declare (``register_method(..., options=...)``) is refused here, before any
    work. A method that declares none has its keys checked at build, against what its builder reads."""
    from attnbench.methods import METHODS
    from attnbench.methods.registry import unknown_option_message

    options = cfg.get("method_options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError("method_options", f"must be a mapping {{method: {{param: value}}}}, got {options!r}")
    for name, given in options.items():
        if given is not None and not isinstance(given, Mapping):
            raise ConfigError(f"method_options.{name}", f"must be a mapping {{param: value}}, got {given!r}")
        if name not in METHODS:
            raise ConfigError(f"method_options.{name}", f"{name!r} is not a registered method; registered: "
                                                        f"{', '.join(sorted(METHODS))}")
        unknown = METHODS[name].unknown_options(given or {})
        if unknown:
            message = unknown_option_message(name, unknown, METHODS[name].options)
            if len(unknown) == 1:  # the field is the key's own path
                raise ConfigError(f"method_options.{name}.{unknown[0]}", message.split(": ", 1)[1])
            raise ConfigError(f"method_options.{name}", message)


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


# ---- size bounds: nothing the planner or the parent computes grows without bound -----------------------------
MAX_ROWS = 1 << 24
"""Longest sequence whose mask the parent counts with an O(seq) closed form (row counts of interval and relative
masks, document ids): ~2 GB and a few seconds at the bound. Full and causal masks count in O(1) at any length."""
MAX_TABLE = 1 << 26
"""Most entries of a block table (BigBird, random block-sparse) the parent builds to count a mask."""
MAX_PAIRS = 1 << 34
"""Most (q, kv) pairs a mask with no closed form (a plugin ``mask_mod``) is evaluated on, in bounded memory."""


def mask_count_work(spec, seq_q: int, seq_kv: int) -> tuple[int, int, str]:
    """(work, bound, how) of counting ``spec``'s visible pairs at these lengths, from the mask's family alone
    (nothing is bound or allocated)."""
    from attnbench.masks.basic import BoundCausal, BoundFull
    from attnbench.masks.families import BlockTableMask, PrefixTermsMask, RelativeMask

    cls = spec.bound_cls
    if issubclass(cls, (BoundFull, BoundCausal)):
        return 1, 1, "a closed form"
    if issubclass(cls, BlockTableMask):
        block = getattr(spec, "block", None)
        if isinstance(block, int) and block > 0:
            table = math.ceil(seq_q / block) * math.ceil(seq_kv / block)
            if table > MAX_TABLE:
                return table, MAX_TABLE, f"a block table of {table:,} entries"
            return seq_q + seq_kv, 2 * MAX_ROWS, f"an O(seq) closed form over {seq_q + seq_kv:,} positions"
    elif issubclass(cls, (PrefixTermsMask, RelativeMask)):
        return seq_q + seq_kv, 2 * MAX_ROWS, f"an O(seq) closed form over {seq_q + seq_kv:,} positions"
    return seq_q * seq_kv, MAX_PAIRS, f"evaluating its mask_mod on {seq_q * seq_kv:,} (q, kv) pairs"


def mask_size_problem(spec, seq_q: int, seq_kv: int) -> str | None:
    """Why the parent refuses to count ``spec`` at these lengths (too large), or None."""
    work, bound, how = mask_count_work(spec, seq_q, seq_kv)
    if work <= bound:
        return None
    return (f"mask {spec.label} at {seq_q}x{seq_kv} is too large to plan: counting its visible pairs needs {how}, "
            f"over the bound of {bound:,} (attnbench.config.plan)")


def input_bytes(case: Case) -> int:
    """Bytes of the case's inputs alone: q, k, v (and the output gradient with backward)."""
    q_like = case.batch * case.heads_q * case.seq_q * case.head_dim
    kv_like = case.batch * case.heads_kv * case.seq_kv * case.head_dim
    return (q_like * (2 if case.needs_grad else 1) + 2 * kv_like) * DTYPE_BYTES[case.dtype]


def device_memory_bytes(device: str) -> int | None:
    """Total memory of ``device`` (physical RAM for the CPU), or None where it cannot be read."""
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AssertionError):
        return None


# ---- capability filtering ----------------------------------------------------------------------------------
def unsupported_reason(case: Case, spec, caps, available: tuple[bool, str], options: dict) -> str | None:
    """Why ``case`` cannot run by the method's declaration, or None when it can."""
    ok, why = available
    if not ok:
        return f"method unavailable: {why}"
    device_kind = case.device.split(":")[0]
    if device_kind not in caps.devices:
        return f"runs on {', '.join(caps.devices)} only, not {device_kind}"
    dtypes = caps.dtypes_on(device_kind)
    if case.dtype not in dtypes:
        where = f" on {device_kind}" if dtypes != caps.dtypes else ""
        return f"dtype {case.dtype} not supported{where} (supports {', '.join(dtypes)})"
    if caps.head_dims is not None and case.head_dim not in caps.head_dims:
        return f"head_dim {case.head_dim} not supported (supports {caps.head_dims})"
    if caps.max_head_dim is not None and case.head_dim > caps.max_head_dim:
        return f"head_dim {case.head_dim} over the maximum {caps.max_head_dim}"
    if case.heads_kv != case.heads_q and not caps.gqa:
        return "no grouped-query attention (heads_kv < heads_q)"
    if case.mode == "decode" and not caps.decode:  # before cross: a decode case has seq_q != seq_kv too
        return "no decode mode"
    if case.seq_q != case.seq_kv and not caps.cross and case.mode != "decode":
        # decode is one query against a cache (bottom-right aligned): declaring decode is enough for it
        return "no cross attention (seq_q != seq_kv)"
    if case.needs_grad and not caps.backward:
        return "no backward pass"
    if caps.causal_only and not spec.causal:
        return f"causal masks only (a recurrence or scan), and {spec.name} is not causal"
    if not caps.runs_mask(spec.name):
        return f"mask {spec.name} not supported natively and no dense-mask path"
    too_large = mask_size_problem(spec, case.seq_q, case.seq_kv)
    if too_large:
        return too_large
    memory = options.get("device_memory_bytes")
    if memory and input_bytes(case) > memory:
        return (f"the inputs alone need {input_bytes(case) / 2**30:,.1f} GiB, over the device's "
                f"{memory / 2**30:,.1f} GiB of memory")
    if not caps.native_mask(spec.name) and not caps.dense_mask and caps.varlen:
        bound = spec.bind(case.seq_q, case.seq_kv)
        if bound.varlen() is None:
            return f"mask {case.mask} has no varlen form, the only non-native path of this method"
    if not caps.native_mask(spec.name) and caps.dense_mask and not caps.varlen:
        needed = case.seq_q * case.seq_kv * DTYPE_BYTES[case.dtype]  # an additive bias in the working dtype
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
    budgets = {key: FIELDS[key].kind(key, cfg.get(key, FIELDS[key].default))
               for key in ("dense_mask_budget_mb", "materialize_budget_mb")}
    return {
        "dense_mask_bytes": int(budgets["dense_mask_budget_mb"] * 2**20),
        "materialize_bytes": int(budgets["materialize_budget_mb"] * 2**20),
    }


def build_plan(cfg: dict) -> Plan:
    """Validate ``cfg`` (a plain dict) and expand it; raises ``ConfigError`` before any work."""
    from attnbench.methods import METHODS

    cfg = validate_config(cfg)
    method_names = resolve_methods(cfg)
    check_method_options(cfg)
    specs = resolve_masks(cfg)
    pairs = length_pairs(cfg)
    batches = cfg["batch"] if cfg["batch"] is not None else [None]
    tokens = cfg["tokens"]
    if None in batches and tokens is None:
        batches = [1 if b is None else b for b in batches]
    heads_q = cfg["heads_q"]
    heads_kv = cfg["heads_kv"] if cfg["heads_kv"] is not None else [None]
    head_dims = cfg["head_dim"]
    dtypes = cfg["dtype"]
    modes = cfg["modes"]
    from attnbench.cp import plan as cp_plan  # CP hook: layouts x cp world sizes x cp_balance

    layouts = cp_plan.layout_axis(cfg)
    seed = cfg["seed"]
    decode_queries = cfg["decode_queries"]
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
    options["device_memory_bytes"] = device_memory_bytes(device_kind)

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
    notes = []
    if None in batches:
        used = {sq for sq, _ in pairs} if any(m != "decode" for m in modes) else set()
        used |= {max(decode_queries, skv) for _, skv in pairs} if "decode" in modes else set()
        above = sorted(n for n in used if n > tokens)
        if above:
            notes.append(f"tokens={tokens} is below the length(s) {', '.join(map(str, above))}: those cases run "
                         f"batch 1 (batch = max(1, tokens // seq))")
    return Plan(runnable=runnable, unsupported=unsupported, devices=devices, notes=notes)

