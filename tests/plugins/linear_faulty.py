"""Deliberately broken linear-family methods (negative controls), loaded as a plugin by path."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbench.methods import Capabilities, Prepared, register_method
from attnbench.methods.linear import common


@register_method("t_linear_no_state", Capabilities(**common.KERNELIZED_CAPS))
def build_no_state(ctx):
    """Causal linear attention whose chunked form forgets the state carried between chunks."""
    causal, offset = common.mask_mode(ctx)

    def feats(q, k):
        return F.elu(q.float()) + 1, F.elu(k.float()) + 1

    def fn(q, k, v):
        fq, fk = feats(q, k)
        chunk = 4
        outs = [common.naive_linear(fq[:, :, i:i + chunk], fk[:, :, i:i + chunk], v[:, :, i:i + chunk],
                                    causal=True, offset=0, eps=1e-6) for i in range(0, q.shape[2], chunk)]
        return torch.cat(outs, dim=2).to(v.dtype)

    def reference(q, k, v):
        fq, fk = feats(q, k)
        return common.naive_linear(fq, fk, v, causal=causal, offset=offset, eps=1e-6)

    return Prepared(fn=fn, reference=reference, softmax_comparable=False)
