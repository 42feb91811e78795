"""Where the memory of the delta rules' chunked PyTorch form goes, measured on the CPU (issue 10).

Prints bytes per token per (batch, head) of

* ``fwd peak``: the peak of live tensor bytes during a forward without gradients, above the inputs;
* ``fwd_bwd peak``: the same over a forward and a backward (the inputs' gradients included);
* ``kept``: the live bytes between the forward and the backward (the output included): what autograd saves,
  and what a checkpoint keeps outside autograd's saved tensors (its inputs, the carried states);
* ``saved``: the bytes autograd saves between the forward and the backward, counted by
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once; a checkpointed segment's tensors are
  saved under the checkpoint's own hooks, not counted here: see ``kept``).

Live bytes are counted by a ``TorchDispatchMode`` that sees every op's outputs and follows each new storage
until it is freed (``weakref.finalize`` on the storage; PyTorch keeps a storage's Python object alive as long
as the storage itself lives, autograd's saved copies included). Temporaries that an op allocates and frees
inside itself are not seen, so the peaks are lower bounds (within a few per cent here).

Usage: ``python scripts/linear_memory.py [--method gated_delta_rule] [--lengths 2048,8192] [--heads 2]
[--dim 128] [--chunk 64] [--segment 0] [--dtype bfloat16]``. Nothing is written.
"""
from __future__ import annotations

import argparse
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages created by ops while active that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in given:  # a new storage, not a view or in-place
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out


def saved_bytes(run, inputs=()) -> tuple:
    """Bytes of the distinct storages autograd saves while ``run()`` builds its graph (kept until backward),
    the storages of ``inputs`` not counted (they exist anyway), and ``run()``'s result."""
    seen: dict[int, int] = {}
    given = {t.untyped_storage().data_ptr() for t in inputs}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in given:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


def measure(method: str, length: int, heads: int, dim: int, chunk: int, segment: int, dtype):
    from attnbench.methods.linear import gated_delta

    gated, delta, normalize = gated_delta.VARIANTS[method]
    gen = torch.Generator().manual_seed(0)
    shape = (1, heads, length, dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(shape[:3], generator=gen)) if gated else None
    beta = torch.rand(shape[:3], generator=gen) if delta else None
    kw = dict(gated=gated, delta=delta, normalize=normalize, chunk=chunk)
    if segment:
        kw["segment"] = segment
    leaves = [t for t in (q, k, v, g, beta) if t is not None]

    with torch.no_grad(), LiveBytes() as fwd:
        gated_delta.chunked(q, k, v, g, beta, **kw)
    for t in leaves:
        t.requires_grad_(True)
    with LiveBytes() as both:
        saved, out = saved_bytes(lambda: gated_delta.chunked(q, k, v, g, beta, **kw), leaves)
        kept = both.now
        torch.autograd.grad(out, leaves, torch.ones_like(out))
        del out
    per = length * heads
    return fwd.peak / per, both.peak / per, kept / per, saved / per


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="gated_delta_rule", choices=["gated_delta_rule", "delta_rule", "simple_gla"])
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--segment", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    print(f"{a.method}: heads {a.heads}, head dim {a.dim}, chunk {a.chunk}, segment {a.segment}, {a.dtype}; "
          "bytes per token per head")
    print(f"{'length':>9} {'fwd peak':>10} {'fwd_bwd peak':>13} {'kept':>10} {'saved':>10}")
    for length in (int(x) for x in a.lengths.split(",")):
        f, fb, k, s = measure(a.method, length, a.heads, a.dim, a.chunk, a.segment, dtype)
        print(f"{length:>9} {f:>10.0f} {fb:>13.0f} {k:>10.0f} {s:>10.0f}")


if __name__ == "__main__":
    main()
