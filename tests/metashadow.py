"""Run attention code at any length on the CPU without memory: float tensors on the ``meta`` device, small integer
tensors real (:class:`MetaShadow`), and record the largest single allocation any op makes.

Meta tensors carry shapes, dtypes and strides but no data, so a method runs at 1M tokens in milliseconds and an
``[L, L]`` matrix costs nothing to "allocate" (its size is what is measured). What meta tensors cannot do is run
code that reads values: the rows forms of the references pick query rows (``nonzero``, ``int(rows.max())``,
``.tolist()``, ``unique``). Under :class:`MetaShadow` integer and bool tensors of at most ``SMALL`` elements that
come from CPU tensors or factories hold real values on the CPU (row indices, positions, small masks), every
floating tensor lives on meta, and an op that mixes the two runs on meta (its CPU arguments moved there). An
integer op whose result would be larger than ``SMALL`` (an ``[L, L]`` comparison of two position ranges) is
answered on meta, so it is measured, never computed. Code that needs the value of a floating tensor (``.item()``
of a sum, ``if t.any():``) fails here: such methods cannot be audited this way.

``MetaShadow.largest`` is the largest storage, in bytes, that any op creates (views and in-place results share
their input's storage and are not new allocations), with ``where`` (op, shape, dtype). Backward ops run through
the mode too (``torch.autograd.grad`` inside it).

:func:`cpu_generators` lets code make ``torch.Generator(device="meta")``: a CPU generator (drawing a meta tensor
reads no random numbers), as builders and the case runner do for the case's device.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

META = torch.device("meta")
CPU = torch.device("cpu")
SMALL = 1 << 22  # integer/bool results up to this many elements are computed for real on the CPU
_aten = torch.ops.aten
# pointwise ops whose result has the inputs' (one) floating dtype: answered without the meta kernel (see _pointwise)
SAME_DTYPE_POINTWISE = frozenset({_aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.div.Tensor,
                                  _aten.neg.default, _aten.exp.default})


def _tensors(obj, found: list) -> list:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, (list, tuple, dict)):
                _tensors(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, found)
    return found


def _to_meta(t):
    return t.to(META) if isinstance(t, torch.Tensor) and t.device.type != "meta" else t


def _row_major(t: torch.Tensor) -> bool:
    """Strides strictly decreasing along the dims (size-1 and broadcast dims aside): TensorIterator then lays a
    pointwise result out contiguous."""
    previous = None
    for size, stride in zip(t.shape, t.stride()):
        if size == 1 or stride == 0:
            continue
        if previous is not None and stride >= previous:
            return False
        previous = stride
    return True


def _pointwise(func, args, kwargs, inputs):
    """The result of a :data:`SAME_DTYPE_POINTWISE` op on row-major meta tensors of one floating dtype (and plain
    Python numbers): a contiguous tensor of the broadcast shape, as the meta kernel gives it, without the cost
    of torch's Python meta implementation (about 100 µs an op, most of the audit's time). None otherwise."""
    if func not in SAME_DTYPE_POINTWISE or (kwargs and set(kwargs) - {"alpha"}):
        return None
    dtype = inputs[0].dtype
    if not dtype.is_floating_point:
        return None
    for t in inputs:
        if t.dtype != dtype or not _row_major(t):
            return None
    for arg in args:
        if not isinstance(arg, torch.Tensor) and (isinstance(arg, bool) or not isinstance(arg, (int, float))):
            return None
    return torch.empty(torch.broadcast_shapes(*(t.shape for t in inputs)), dtype=dtype, device=META)


class MetaShadow(TorchDispatchMode):
    """See the module docstring. ``largest``: bytes of the largest new storage; ``where``: (op, shape, dtype)
    of it; ``ops``: how many ops ran."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.where: tuple | None = None
        self.ops = 0

    def _note(self, out, inputs, func) -> None:
        ours = None
        for t in (out,) if isinstance(out, torch.Tensor) else _tensors(out, []):
            nbytes = t.untyped_storage().nbytes()
            if nbytes <= self.largest:
                continue
            if ours is None:  # a view or an in-place result shares an input's storage: not an allocation
                ours = {i.untyped_storage()._cdata for i in inputs}
            if t.untyped_storage()._cdata not in ours:
                self.largest, self.where = nbytes, (str(func), tuple(t.shape), t.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        inputs = _tensors(args, [])
        if kwargs:
            _tensors(kwargs, inputs)
        on_meta = sum(t.device.type == "meta" for t in inputs)
        if on_meta == len(inputs) and on_meta:
            out = _pointwise(func, args, kwargs, inputs)
            if out is None:
                out = func(*args, **kwargs)
        elif on_meta:
            out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
        else:  # CPU tensors and factories: real when the result is small and not floating, else meta
            probe_kwargs = dict(kwargs, device=META) if "device" in kwargs else kwargs
            try:
                shaped = func(*tree_map(_to_meta, args), **tree_map(_to_meta, probe_kwargs))
            except (NotImplementedError, RuntimeError):  # no meta kernel (a data-dependent shape): run it for real
                shaped = None
            results = _tensors(shaped, [])
            if shaped is not None and any(t.is_floating_point() or t.is_complex() or t.numel() > SMALL
                                          for t in results):
                out = shaped
            else:
                real_kwargs = kwargs
                if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta":
                    real_kwargs = dict(kwargs, device=CPU)
                out = func(*args, **real_kwargs)
        self._note(out, inputs, func)
        return out


_Generator = torch.Generator


class _CpuForMeta(_Generator):
    """``torch.Generator(device="meta")`` as a CPU generator (see :func:`cpu_generators`)."""

    def __new__(cls, device=None):
        device = torch.device("cpu" if device is None else device)
        return _Generator.__new__(cls, device="cpu" if device.type == "meta" else device)

    def __init__(self, device=None):  # the generator is made by __new__
        pass


@contextlib.contextmanager
def cpu_generators():
    """Within: ``torch.Generator(device="meta")`` gives a CPU generator (meta has none; drawing a meta tensor
    from a CPU generator is allowed and reads nothing)."""
    torch.Generator = _CpuForMeta
    try:
        yield
    finally:
        torch.Generator = _Generator
