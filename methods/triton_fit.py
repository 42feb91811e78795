"""Do a call's Triton kernels fit a GPU that is not here? Compiled offline, on the CPU.

The own Triton kernels (``methods/linear/linear_triton.py``, ``gla_triton.py``, ...) are tested for values on
the CPU with ``TRITON_INTERPRET=1``, but the interpreter knows nothing of a GPU's resources: a launch whose
software pipeline needs more shared memory than an SM has compiles only on the GPU and fails there
(``OutOfResources: shared memory, Required: 253952, Hardware limit: 232448`` was cosFormer's fwd_bwd on the
H200, its 256-wide features in the dv scan at 3 pipeline stages; results/h200-linear-kernelized-triton).
Triton's compiler and ``ptxas`` need no GPU, so this module records the launches a call makes and compiles
each one for the target architecture with the same specialisation the JIT would give it (argument alignment
and divisibility, constexprs, ``num_warps`` / ``num_stages``), then compares the shared memory it needs with
the target's limit:

    with record_launches() as launches:      # kernels are recorded, not run: outputs are garbage
        out = linear_attn(q, k, v, feature_map="identity"); out.sum().backward()
    for fit in compile_fits(launches):       # one Fit per distinct launch, H200 (sm_90) by default
        assert fit.ok, fit

Shared memory comes from the compiler's metadata; registers and spills from the ``ptxas -v`` that Triton
bundles (:func:`ptxas_usage`, a proxy for speed: scripts/triton_spills.py prints both for the linear kernels).
Tensors may be on the CPU: a launch only needs their dtypes, strides and data pointers. Used by
tests/test_triton_fit.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

# H100 / H200 (sm_90): 227 KB of shared memory per block at most (the "Hardware limit" Triton reports)
SM90 = dict(arch=90, warp_size=32, shared_limit=232448)


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: object  # the triton JITFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclasses.dataclass(frozen=True)
class Fit:
    name: str
    constexprs: dict
    num_warps: int
    num_stages: int
    shared: int
    limit: int

    @property
    def ok(self) -> bool:
        return self.shared <= self.limit


@contextlib.contextmanager
def record_launches():
    """Inside the block every Triton JIT launch is recorded (into the yielded list) instead of run."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))
        return None

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def compile_launch(launch: Launch, target=SM90, **overrides):
    """The compiled kernel of ``launch`` for ``target`` (``overrides``: launch keywords replaced, e.g.
    ``num_stages=3``), specialised as the JIT would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    gpu = GPUTarget("cuda", target["arch"], target["warp_size"])
    backend = make_backend(gpu)
    fn = launch.kernel
    kwargs = {**launch.kwargs, **overrides}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)


def compile_fits(launches, target=SM90, **overrides) -> list[Fit]:
    """One :class:`Fit` per distinct launch (same kernel and constexprs and launch options compile once)."""
    fits, seen = [], set()
    for launch in launches:
        kernel = compile_launch(launch, target, **overrides)
        opts = kernel.metadata
        consts = {k: v for k, v in {**launch.kwargs, **overrides}.items()
                  if k not in ("num_warps", "num_stages") and isinstance(v, (int, str)) and not isinstance(v, bool)}
        key = (launch.name, tuple(sorted(consts.items())), opts.num_warps, opts.num_stages)
        if key in seen:
            continue
        seen.add(key)
        fits.append(Fit(launch.name, consts, opts.num_warps, opts.num_stages, int(opts.shared),
                        target["shared_limit"]))
    return fits


def ptxas_usage(kernel, arch: str = "sm_90a") -> tuple[int, int, int]:
    """(spill store bytes, spill load bytes, registers) per thread of a compiled kernel, from ``ptxas -v``
    (the one bundled with Triton) on its PTX."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([ptxas, "-v", f"-arch={arch}", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    return int(spill.group(1)), int(spill.group(2)), int(regs.group(1))
