"""A stand-in for an accelerator on a CPU-only machine: run code with ``device="meta"`` under :class:`OnFakeDevice`.

Torch itself lets many ops mix meta and CPU tensors (``einsum`` of a meta and a CPU tensor answers on the CPU),
where CUDA raises "Expected all tensors to be on the same device". This mode raises that error for every torch
call whose tensor arguments (beyond 0-dim CPU scalars, which CUDA accepts) lie on both the fake device and the
CPU, so a tensor created on the CPU and used with device tensors is caught without a GPU. Moving data off the
fake device (``.cpu()``, ``.to("cpu")``, ``.item()``, ``float()``) answers zeros of the right shape and dtype:
the code runs to its end, its numbers are meaningless (only device placement is checked)."""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

FAKE = "meta"
MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.copy_, torch.Tensor.new_tensor,
         torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full}


def _to_cpu(args, kwargs) -> bool:
    target = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, (str, torch.device))]
    return any(torch.device(t).type == "cpu" for t in target)


class OnFakeDevice(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if first is not None and first.device.type == FAKE:
            if func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_cpu(args, kwargs)):
                dtype = next((a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.dtype)), first.dtype)
                return torch.zeros(first.shape, dtype=dtype)
            if func in (torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
                        torch.Tensor.tolist):
                value = torch.zeros(first.shape, dtype=first.dtype)
                return func(value)
        if func not in MOVES:
            fake = [t for t in tensors if t.device.type == FAKE]
            cpu = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if fake and cpu:
                name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
                self.mixed.append(name)
                raise RuntimeError(f"Expected all tensors to be on the same device, but {name} got a CPU tensor "
                                   f"of shape {tuple(cpu[0].shape)} beside tensors on the device")
        return func(*args, **kwargs)
