"""Compile the own linear-attention Triton kernels for an H100/H200 (sm_90a) without a GPU and print each
variant's register spills (ptxas -v, the ptxas bundled with triton): a proxy for their speed that the CPU can
give, and a check that they compile at all (Triton's interpreter, which the CPU tests use, compiles nothing).
Head dim 128, chunk 64, block_v 64, bf16, as in the H200 sweep.

    python scripts/triton_spills.py            # num_warps 4 and 8
    python scripts/triton_spills.py 4 8 16
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnbench.methods.linear import gla_triton, linear_triton

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
SCAN = dict(DK=128, DV=128, BK=128, BV=64, CH=64, SEG=4, PRECISION="tf32", DOT_T=tl.bfloat16)
OFF = dict(HAS_S0=1, HAS_U=0, TRANS_S=0, FEATURE=0, NORM=0, EXTRA=0, DIVR=0, GRADX=0, REVERSE=0, MASK_INTRA=1)
LINEAR_SCANS = {  # what linear_triton.linear_attn launches
    "forward (precomputed φ)": dict(NORM=1),
    "forward (fused φ)": dict(NORM=1, FEATURE=1),
    "dq": dict(HAS_U=1, TRANS_S=1, EXTRA=1, DIVR=1, GRADX=1),
    "dk": dict(HAS_U=1, EXTRA=2, GRADX=1, REVERSE=1),
    "dv": dict(TRANS_S=1, REVERSE=1),
}
STATES = dict(DK=128, DV=128, BK=64, BV=64, CH=64, SEG=4, PRECISION="tf32", NSEG_INTERP=0, DOT_T=tl.bfloat16)
LINEAR_STATES = {"forward": dict(NORM=1, FEATURE=0, EXTRA=0, REVERSE=0),
                 "forward (fused φ)": dict(NORM=1, FEATURE=1, EXTRA=0, REVERSE=0),
                 "dk / dv": dict(NORM=0, FEATURE=0, EXTRA=2, REVERSE=1)}
FP32_PTRS = {"DEN", "S0", "Z0", "E", "U0", "G", "R"}
FLOATS = {"eps", "scale"}


def spills(src, constants: dict, num_warps: int) -> tuple[int, int, int]:
    """(spill store bytes, spill load bytes, registers) of one kernel variant."""
    fn = triton.jit(src)
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in FLOATS:
            signature[name] = "fp32"
        elif name[0].isupper() and len(name) <= 3 and name not in ("T", "H", "GA", "GB", "GX", "NSEG"):
            signature[name] = "*fp32" if name in FP32_PTRS else "*bf16"
        else:
            signature[name] = "i32"
    constexprs = {(fn.arg_names.index(k),): v for k, v in constants.items()}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=TARGET,
                            options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([PTXAS, "-v", "-arch=sm_90a", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    return int(spill.group(1)), int(spill.group(2)), int(regs.group(1))


def main(warps: list[int]) -> None:
    rows = [(f"linear scan {k}", linear_triton._chunk_scan_src, {**SCAN, **OFF, **v}) for k, v in LINEAR_SCANS.items()]
    rows += [(f"linear states {k}", linear_triton._chunk_states_src, {**STATES, **v}) for k, v in LINEAR_STATES.items()]
    rows += [("linear rows (dN, p)", linear_triton._rows_src, dict(D=128, BD=128, BT=32, OP=1)),
             ("gla scan", gla_triton._gated_scan_src, {**SCAN, "HAS_S0": 1, "REVERSE": 0, "DECAY_STATE": 1}),
             ("gla states", gla_triton._gated_states_src, {**STATES, "REVERSE": 0, "DECAY_STATE": 1})]
    for name, src, constants in rows:
        constants = {k: v for k, v in constants.items() if k in triton.jit(src).arg_names}
        figures = [spills(src, constants, w) for w in warps]
        print(f"{name:34s}" + "".join(f"  {w} warps: {s}/{l} B spilled, {r} regs" for w, (s, l, r) in zip(warps, figures)),
              flush=True)


if __name__ == "__main__":
    main([int(w) for w in sys.argv[1:]] or [4, 8])
