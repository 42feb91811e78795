"""Methods that end or hang the process that trains with them, for `attnbench train parallel=N` (loaded by path).
Each misbehaves only where it is safe to: never in the main process of a test run."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import torch.nn.functional as F

from attnbench.methods import Capabilities, register_method

CONTROL = dict(family="control", devices=("cpu", "cuda"), masks={"any"}, cross=True, gqa=True, backward=True)


def _exact(ctx):
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.mask.causal)

    return attend


@register_method("q_kills", Capabilities(**CONTROL))
def build_kills(ctx):
    """Seed 0: ends its process at its first call (exit code 139, as a segfault would), but only in a spawned
    worker process (in a main process, e.g. pytest's, it raises instead). Other seeds: exact attention."""
    exact = _exact(ctx)

    def attend(q, k, v):
        if multiprocessing.parent_process() is None:
            raise RuntimeError("q_kills ends only a worker process, and this is a main process")
        os._exit(139)

    return attend if ctx.case.seed == 0 else exact


@register_method("q_hangs", Capabilities(**CONTROL))
def build_hangs(ctx):
    """With ``ATTNBENCH_TEST_HANG_DIR`` set (the stop test's subprocess): writes its pid to a file there and hangs
    at its first call. Without it: exact attention."""
    exact = _exact(ctx)
    folder = os.environ.get("ATTNBENCH_TEST_HANG_DIR")

    def attend(q, k, v):
        Path(folder, f"{os.getpid()}.pid").write_text(str(os.getpid()))
        while True:
            time.sleep(1)

    return attend if folder else exact
