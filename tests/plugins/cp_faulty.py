"""Methods that fail on one rank of a CP gang only (run through the ulysses layout), for the gang tests."""
from __future__ import annotations

import os
import time

import torch.distributed as dist

from attnbench.methods import Capabilities, register_method
from attnbench.methods.exact.reference import reference_attention

CAPS = dict(devices=("cpu", "cuda"), masks={"any"}, backward=False, cross=True, gqa=True, decode=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _good(ctx):
    mask = ctx.mask

    def attend(q, k, v):
        out, _ = reference_attention(q, k, v, mask)
        return out.to(q.dtype)

    return attend


@register_method("t_cp_rank1_raises", Capabilities(**CAPS))
def build_rank1_raises(ctx):
    """Raises on rank 1; rank 0 goes on into the next collective."""
    good = _good(ctx)

    def attend(q, k, v):
        if _rank() == 1:
            raise ValueError("deliberate failure on rank 1")
        return good(q, k, v)

    return attend


@register_method("t_cp_rank1_dies", Capabilities(**CAPS))
def build_rank1_dies(ctx):
    """Rank 1 exits without a word (a segfault's effect)."""
    good = _good(ctx)

    def attend(q, k, v):
        if _rank() == 1:
            os._exit(3)
        return good(q, k, v)

    return attend


@register_method("t_cp_rank1_hangs", Capabilities(**CAPS))
def build_rank1_hangs(ctx):
    """Rank 1 never returns."""
    good = _good(ctx)

    def attend(q, k, v):
        if _rank() == 1:
            marker = os.environ.get("ATTNBENCH_TEST_HANG_MARKER")
            if marker:  # tells a test which process hangs
                with open(marker, "w") as handle:
                    handle.write(str(os.getpid()))
            time.sleep(3600)
        return good(q, k, v)

    return attend


@register_method("t_cp_zgood", Capabilities(**CAPS))
def build_zgood(ctx):
    """Correct (the reference); sorts after the faulty ones, so it runs after them."""
    return _good(ctx)
