"""Planning hooks for CP: the config axes ``layouts``, ``cp``, ``cp_balance``, ``cp_ulysses`` and the reasons a
CP case cannot run (recorded as ``unsupported`` rows before any work).

    layouts: [single, ring, ring_allgather, ulysses, usp, torch_cp, state_pass]   # default [single]
    cp: [2]                          # world sizes of the CP layouts
    cp_balance: [contiguous, zigzag] # load balancing (per_document for packed-document masks)
    cp_ulysses: null                 # usp: ranks per Ulysses group (list); null = automatic

Each CP layout x world size x balance (x Ulysses degree for usp) is one value of the case's ``layout``
(``ring(balance=zigzag)``), with ``world_size`` set; ``single`` is one device.
"""
from __future__ import annotations

from .kernels import KERNEL_OF_METHOD
from .layouts import ADAPTERS, LAYOUT_NAMES, STRATEGIES, LayoutSpec, parse_layout, usp_degree
from .shard import BALANCES


def _config_error():
    from attnbench.config.plan import ConfigError

    return ConfigError


def _list(cfg: dict, field: str, default: list) -> list:
    value = cfg.get(field)
    if value is None:
        return list(default)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise _config_error()(field, "is an empty list; give at least one value")
    return values


def layout_axis(cfg: dict) -> list[tuple[str, int]]:
    """(layout label, world size) pairs of the sweep; ``ConfigError`` naming the field on bad input."""
    ConfigError = _config_error()
    legacy = cfg.get("layout")
    if isinstance(legacy, (list, tuple)):  # the validated config holds the axis as a list
        legacy = next((name for name in legacy if name != "single"), "single")
    if legacy is not None and legacy != "single":
        raise ConfigError("layout", f"{legacy!r} is not one of: single (CP layouts go in `layouts`, e.g. "
                          f"layouts=[single,{legacy}])")
    names = _list(cfg, "layouts", ["single"])
    for name in names:
        if name not in LAYOUT_NAMES:
            raise ConfigError("layouts", f"{name!r} is not one of: {', '.join(LAYOUT_NAMES)}")
    worlds = _list(cfg, "cp", [2])
    for world in worlds:
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ConfigError("cp", f"world sizes must be positive integers, got {world!r}")
    balances = _list(cfg, "cp_balance", ["contiguous"])
    for balance in balances:
        if balance not in BALANCES:
            raise ConfigError("cp_balance", f"{balance!r} is not one of: {', '.join(BALANCES)}")
    degrees = _list(cfg, "cp_ulysses", [0])
    for degree in degrees:
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
            raise ConfigError("cp_ulysses", f"must be positive integers (or null for automatic), got {degree!r}")
    out = []
    for name in dict.fromkeys(names):
        if name == "single":
            out.append(("single", 1))
            continue
        for world in dict.fromkeys(worlds):
            for balance in dict.fromkeys(balances):
                for degree in (dict.fromkeys(degrees) if name == "usp" else [0]):
                    if degree and world % degree:
                        raise ConfigError("cp_ulysses", f"{degree} does not divide the world size {world}")
                    out.append((LayoutSpec(name, balance, degree).label, world))
    return out


def validate_lengths(entries: list[tuple[str, int]], pairs: list[tuple[int, int]]) -> None:
    """A world size must split every self-attention length evenly: W pieces (contiguous) or 2W (zigzag)."""
    ConfigError = _config_error()
    for label, world in entries:
        if label == "single":
            continue
        spec = parse_layout(label)
        pieces = {"contiguous": world, "zigzag": 2 * world}.get(spec.balance)
        for seq_q, seq_kv in pairs:
            if seq_q != seq_kv:
                continue  # cross attention: an unsupported row, not a config error
            if pieces and seq_q % pieces:
                raise ConfigError("cp", f"world size {world} with cp_balance {spec.balance} cuts the sequence into "
                                  f"{pieces} pieces, which do not divide seq_lens {seq_q}")


def unsupported_reason(case, mask_spec, devices: list[str]) -> str | None:
    """Why a CP case cannot run (None when it can, or for ``single``)."""
    if case.layout == "single":
        return None
    spec = parse_layout(case.layout)
    world = case.world_size
    if case.mode == "decode":
        return "CP layouts shard the query sequence; decode has a handful of queries"
    if case.seq_q != case.seq_kv:
        return "CP layouts run self-attention (seq_q == seq_kv)"
    if case.seq_q < 2 * world:
        return f"seq {case.seq_q} is too short for {world} ranks"
    if devices and devices[0].startswith("cuda") and world > len(devices):
        return f"world size {world} needs {world} GPUs, {len(devices)} visible"
    if spec.name in ADAPTERS:
        from .adapters import case_reason

        return case_reason(spec.name, case, mask_spec.name, devices)
    if spec.balance == "per_document":
        bound = mask_spec.bind(case.seq_q, case.seq_kv)
        if getattr(bound, "cu_seqlens", None) is None:
            return f"cp_balance per_document needs a packed-document mask, not {case.mask}"
    if spec.name in ("ring", "ring_allgather", "usp") and case.method not in KERNEL_OF_METHOD:
        return (f"method {case.method} has no CP chunk kernel returning the log-sum-exp (CP kernels: "
                f"{', '.join(sorted(KERNEL_OF_METHOD))}); the ulysses layout runs any method, state_pass the "
                f"methods with a recurrent state")
    if spec.name == "state_pass":
        from attnbench.methods import METHODS

        if METHODS[case.method].caps.exact:
            return (f"state_pass runs methods with a fixed-size recurrent state (linear family); {case.method} is "
                    f"softmax attention (ring, ulysses or usp run it)")
        if spec.balance != "contiguous" and mask_spec.name != "full":
            return (f"state_pass with a {case.mask} mask needs contiguous pieces in rank order (the state flows "
                    f"in position order), not cp_balance {spec.balance}")
    if case.method == "flex" and case.needs_grad and devices and not devices[0].startswith("cuda"):
        return "FlexAttention has no backward on CPU (PyTorch raises NotImplementedError)"
    if spec.name == "ulysses" and case.heads_q % world:
        return f"ulysses splits heads over {world} ranks: heads_q={case.heads_q} is not divisible"
    if spec.name == "usp":
        degree = usp_degree(spec, world, case.heads_q)
        if case.heads_q % degree:
            return f"usp with {degree} Ulysses ranks: heads_q={case.heads_q} is not divisible"
    if spec.name == "torch_cp":
        from .guard import SDPA_BACKENDS

        if case.method not in SDPA_BACKENDS:
            return (f"torch_cp runs SDPA's flash, efficient or cuDNN backend ({', '.join(SDPA_BACKENDS)}), "
                    f"not {case.method}")
        if not (devices and devices[0].startswith("cuda")):
            return ("torch_cp runs on CUDA only: torch's CP ring dispatches the CUDA SDPA kernels; the flash CPU "
                    "kernel has no CP sharding rule for its backward")
        if mask_spec.name not in ("full", "causal"):
            return f"torch_cp takes full or causal masks only (SDPA's is_causal), not {case.mask}"
        if spec.balance == "zigzag" and mask_spec.name != "causal":
            return "torch_cp load balancing (zigzag) requires a causal mask (torch raises otherwise)"
        if spec.balance == "per_document":
            return "torch_cp's SDPA path balances contiguous or head-tail (zigzag) only"
    return None


__all__ = ["layout_axis", "validate_lengths", "unsupported_reason", "STRATEGIES"]
