"""Adapters for external CP libraries: ``yunchang_ulysses`` (yunchang's ``UlyssesAttention``),
``yunchang_usp`` (yunchang's ``LongContextAttention``: Ulysses x ring) and ``ring_flash_attn``
(ring-flash-attn's ring / zigzag ring). Each is available only where its package imports (checked by
importing it, not by finding it: ring-flash-attn imports flash_attn at import time); elsewhere its cases are
``unsupported`` rows whose reason says ``<package> not importable``. Their kernels: flash-attn (``flash_attn``
method) on CUDA; yunchang also runs PyTorch's SDPA backends (``sdpa_*`` methods: its ``AttnType.TORCH_*``),
on CUDA too (its torch ring calls SDPA's flash op whatever the type: a CPU gang raised NotImplementedError).
Full and causal masks only (the libraries take ``causal=``); ``zigzag`` balance maps to the libraries'
zigzag ring (the same head-tail split as ``shard.zigzag``).
"""
from __future__ import annotations

import importlib

import torch.distributed as dist

ADAPTERS = {  # name -> (module it needs, what it runs)
    "yunchang_ulysses": ("yunchang", "yunchang's UlyssesAttention"),
    "yunchang_usp": ("yunchang", "yunchang's LongContextAttention (USP)"),
    "ring_flash_attn": ("ring_flash_attn", "ring-flash-attn's ring / zigzag ring (needs flash_attn)"),
}
# the harness's method -> yunchang's AttnType value (its local kernel)
YUNCHANG_KERNELS = {"flash_attn": "fa", "flash_attn3": "fa3", "sdpa_math": "torch_math", "sdpa_flash": "torch_flash",
                    "sdpa_efficient": "torch_efficient", "sdpa_cudnn": "torch_cudnn"}


def import_adapter_module(name: str):
    """The module adapter ``name`` needs; ImportError (with the cause) when it does not import."""
    module = ADAPTERS[name][0]
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a package that fails while importing is not importable either
        raise ImportError(f"{module} not importable ({type(exc).__name__}: {exc})") from None


def availability(name: str) -> tuple[bool, str]:
    """(True, what it runs) where the adapter's package imports, else (False, '<package> not importable ...')."""
    try:
        import_adapter_module(name)
    except ImportError as exc:
        return False, f"layout {name}: {exc}"
    return True, ADAPTERS[name][1]


def case_reason(name: str, case, mask_name: str, devices: list[str]) -> str | None:
    """Why adapter ``name`` cannot run ``case`` (None when it can)."""
    ok, reason = availability(name)
    if not ok:
        return reason
    if mask_name not in ("full", "causal"):
        return f"layout {name} takes full or causal masks only (the library's causal flag), not {case.mask}"
    cuda = bool(devices) and devices[0].startswith("cuda")
    if name == "ring_flash_attn":
        if case.method != "flash_attn":
            return f"layout ring_flash_attn runs flash-attn's kernel: method flash_attn only, not {case.method}"
        if not cuda:
            return "layout ring_flash_attn runs flash-attn's CUDA kernels only"
    elif case.method not in YUNCHANG_KERNELS:
        return (f"layout {name} runs yunchang's local kernels ({', '.join(sorted(YUNCHANG_KERNELS))}), "
                f"not {case.method}")
    elif not cuda:  # its torch path also ends in SDPA's flash op (seen on CPU with yunchang 0.6.4)
        return f"layout {name} runs on CUDA only (yunchang's torch ring calls SDPA's CUDA flash op)"
    return None


_YUNCHANG_GROUPS: dict = {}


def build(ctx, spec_name: str):
    """``BuiltLayout`` of an adapter on this rank (``LayoutUnsupported`` with the reason where it cannot)."""
    from .layouts import BuiltLayout, LayoutUnsupported, usp_degree
    from .kernels import expand_heads

    module = import_adapter_module(spec_name)  # the planner checked; an ImportError here is an error row
    case, world, rank = ctx.case, ctx.world, ctx.rank
    causal = ctx.case.mask_name == "causal"
    if ctx.spec.balance not in ("contiguous", "zigzag"):
        raise LayoutUnsupported(f"layout {spec_name}: balance {ctx.spec.balance} (contiguous or zigzag only)")
    zigzag = ctx.spec.balance == "zigzag"
    expand = case.heads_kv != case.heads_q

    def bshd(t):
        return t.transpose(1, 2).contiguous()

    if spec_name == "ring_flash_attn":
        attend = module.zigzag_ring_flash_attn_func if zigzag else module.ring_flash_attn_func

        def run(q, k, v):
            return attend(q, k, v, causal=causal, softmax_scale=ctx.scale, group=dist.group.WORLD)
    else:
        attn_type = importlib.import_module(f"{module.__name__}.kernels").AttnType.from_string(
            YUNCHANG_KERNELS[case.method])
        if spec_name == "yunchang_ulysses":
            if zigzag:
                raise LayoutUnsupported("layout yunchang_ulysses: zigzag balance is for the ring (use yunchang_usp)")
            layer = module.UlyssesAttention(dist.group.WORLD, attn_type=attn_type)
        else:
            groups = importlib.import_module(f"{module.__name__}.globals").PROCESS_GROUP
            degree = usp_degree(ctx.spec, world, case.heads_q)
            key = (degree, world // degree)
            if key not in _YUNCHANG_GROUPS:  # new_group is collective: every rank asks in the same order
                module.set_seq_parallel_pg(degree, world // degree, rank, world)
                _YUNCHANG_GROUPS[key] = (groups.ULYSSES_PG, groups.RING_PG)
            groups.ULYSSES_PG, PROCESS_GROUP.RING_PG = _YUNCHANG_GROUPS[key]
            layer = module.LongContextAttention(ring_impl_type="zigzag" if zigzag else "basic", attn_type=attn_type)

        def run(q, k, v):
            return layer(q, k, v, softmax_scale=ctx.scale, causal=causal)

    def fn(q, k, v):
        if expand:
            k, v = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
        out = run(bshd(q), bshd(k), bshd(v))
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    return BuiltLayout(fn, notes=f"{ADAPTERS[spec_name][1]} ({'zigzag' if zigzag else 'contiguous'})")
