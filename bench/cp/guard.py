"""PyTorch's ``context_parallel`` as a layout, entered so that nothing leaks into later cases.

``context_parallel()`` patches ``F.scaled_dot_product_attention`` (and DTensor's op handlers and CP options)
on entry and restores them on exit; in torch 2.11 the restore is not in a ``finally``, so an exception inside
the context leaves SDPA patched for the rest of the process. ``guarded_context_parallel`` snapshots that state
first and puts it back whatever happens (the worker is also replaced after any exception: two lines of
defence).

The layout runs the rank's local shards through SDPA inside the context (torch converts them to DTensors
sharded on the sequence): ``contiguous`` = no load balancing, ``zigzag`` = torch's head-tail balancer, which
holds the same chunks as ``shard.make_shards("zigzag")``. Only SDPA's flash, efficient and cuDNN backends,
full or causal masks (torch raises on the math backend, masks and load balancing without causal).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .layouts import BuiltLayout, CPContext, LayoutUnsupported

SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION"}


def cp_module():
    """The module holding torch's CP implementation (its path moved between releases)."""
    import importlib

    for name in ("torch.distributed.tensor.experimental._context_parallel._attention",
                 "torch.distributed.tensor.experimental._attention"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "_cp_options"):
            return module
    raise ImportError("torch's context-parallel module (with _cp_options) not found in this torch")


def _snapshot():
    module = cp_module()
    state = {"sdpa": F.scaled_dot_product_attention, "module": module}
    options = getattr(module, "_cp_options", None)
    if options is not None:
        state["options"] = {k: getattr(options, k) for k in ("enable_load_balance", "rotate_method", "convert_to_f32")
                            if hasattr(options, k)}
    for name in ("_dispatch_mode",):
        if hasattr(module, name):
            state[name] = getattr(module, name)
    replaced = getattr(module, "_replaced_functions", None)
    if isinstance(replaced, dict):
        state["replaced"] = dict(replaced)
    try:
        from torch.distributed.tensor import DTensor

        state["handlers"] = dict(DTensor._op_dispatcher._custom_op_handlers)
    except Exception:  # noqa: BLE001 - older layouts of DTensor: nothing to restore there
        pass
    return state


def _restore(state) -> None:
    module = state["module"]
    if F.scaled_dot_product_attention is not state["sdpa"]:
        disable = getattr(module, "_disable_context_parallel_dispatcher_impl", None)
        if disable is not None:
            try:
                disable()
            except Exception:  # noqa: BLE001 - restored by hand below
                pass
        F.scaled_dot_product_attention = state["sdpa"]
        torch.nn.functional.scaled_dot_product_attention = state["sdpa"]
    options = getattr(module, "_cp_options", None)
    for key, value in state.get("options", {}).items():
        setattr(options, key, value)
    if "_dispatch_mode" in state:
        module._dispatch_mode = state["_dispatch_mode"]
    if "replaced" in state:
        module._replaced_functions.clear()
        module._replaced_functions.update(state["replaced"])
    if "handlers" in state:
        from torch.distributed.tensor import DTensor

        DTensor._op_dispatcher._custom_op_handlers = dict(state["handlers"])


@contextlib.contextmanager
def guarded_context_parallel(mesh, buffers, seq_dims, no_restore=(), load_balance=None,
                             context_parallel=None):
    """``context_parallel(mesh, ...)`` whose patches are undone on every exit, normal or not.
    ``load_balance``: set torch's option for the duration (None = leave it). ``context_parallel``: the
    context manager to enter (tests pass a leaking one); default torch's."""
    if context_parallel is None:
        from torch.distributed.tensor.experimental import context_parallel
    state = _snapshot()
    try:
        if load_balance is not None:
            cp_module()._cp_options.enable_load_balance = bool(load_balance)
        manager = context_parallel(mesh, buffers=list(buffers), buffer_seq_dims=list(seq_dims),
                                   no_restore_buffers=set(no_restore))
        with manager:
            yield
    finally:
        _restore(state)


def build_torch_cp(ctx: CPContext) -> BuiltLayout:
    case, spec = ctx.case, ctx.spec
    if case.method not in SDPA_BACKENDS:
        raise LayoutUnsupported(f"torch_cp runs SDPA's flash, efficient or cuDNN backend (methods "
                                f"{', '.join(SDPA_BACKENDS)}), not {case.method}")
    mask = ctx.bound
    causal_offset = getattr(mask, "offset", None)
    if mask.spec.name == "full":
        causal = False
    elif mask.spec.name == "causal" and causal_offset == 0:
        causal = True
    else:
        raise LayoutUnsupported(f"torch_cp takes full or causal masks only (SDPA's is_causal), not {mask.label}")
    if spec.balance not in ("contiguous", "zigzag"):
        raise LayoutUnsupported(f"torch_cp balances contiguous or zigzag (head-tail), not {spec.balance}")
    if spec.balance == "zigzag" and not causal:
        raise LayoutUnsupported("torch_cp load balancing (zigzag) requires a causal mask (torch raises otherwise)")
    if case.seq_q % (2 * ctx.world if spec.balance == "zigzag" else ctx.world):
        raise LayoutUnsupported(f"torch_cp needs seq {case.seq_q} divisible by "
                                f"{2 * ctx.world if spec.balance == 'zigzag' else ctx.world}")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        raise LayoutUnsupported(f"torch_cp unavailable: {exc}") from None
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    backend = getattr(SDPBackend, SDPA_BACKENDS[case.method])
    gqa = {"enable_gqa": True} if case.heads_kv != case.heads_q else {}
    # torch shards its buffers itself; we give it a placeholder of the sequence's length (not restored) and
    # call SDPA on our own shards, which hold the chunks its balancer expects
    placeholder = torch.zeros(1, 1, case.seq_q, 1, device=ctx.device)
    failing = ctx.options.get("cp_fail_inside")  # tests: raise inside the context, where SDPA is patched

    def context():
        return guarded_context_parallel(mesh, [placeholder], [2], no_restore=[placeholder],
                                        load_balance=spec.balance == "zigzag")

    unpatched = F.scaled_dot_product_attention

    def fn(q, k, v):
        if failing:
            patched = F.scaled_dot_product_attention is not unpatched
            raise RuntimeError(f"deliberate failure inside context_parallel (SDPA patched: {patched})")
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)

    return BuiltLayout(fn, context=context, notes="torch context_parallel (SDPA patched inside the guard)")
