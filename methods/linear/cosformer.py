"""cosFormer (Qin et al., ICLR 2022, arXiv:2202.08791), methods-spec §12d.

Similarity ``ReLU(q_i)·ReLU(k_j) · cos(π/2 · (i − j)/M)`` with ``M = max(seq_q, seq_kv)`` (the reference
code's choice), decomposed (Ptolemy) into the 2d-dimensional features ``[ReLU(x) sin(a_p), ReLU(x) cos(a_p)]``,
``a_p = π p / 2M`` at the token's absolute position p (query i at ``i + offset``), then the linear-attention
skeleton, ε = 1e-6. A different operator (class N): no ``approx_err``. No parameters. M is fixed by the
case's lengths, so a decode step uses the M of the whole cache.

``impl``: ``chunked`` (default, the PyTorch chunked form) or ``triton``: the 2d-wide features above through
the own Triton scan (causal self-attention, head dim <= 128 so that 2d <= 256; otherwise ``unsupported``;
methods/linear/common.py ``kernelized``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import Capabilities, register_method
from .common import KERNELIZED_CAPS, KERNELIZED_OPTIONS, expand_heads, kernelized


def cos_features(x, pos, M: int):
    angle = (math.pi / (2 * M)) * pos.float()
    rx = F.relu(x.float())
    return torch.cat([rx * torch.sin(angle)[:, None], rx * torch.cos(angle)[:, None]], dim=-1)


@register_method("cosformer", Capabilities(**KERNELIZED_CAPS, prefix_closed=True), options=KERNELIZED_OPTIONS)
def build_cosformer(ctx):
    """cosFormer: ReLU features with cos re-weighting by position (Ptolemy decomposition)."""
    M = max(ctx.case.seq_q, ctx.case.seq_kv)

    def features(q, k, v, q_pos, k_pos):
        heads = q.shape[1]
        return (cos_features(q, q_pos, M), cos_features(expand_heads(k, heads), k_pos, M),
                expand_heads(v, heads))

    return kernelized(ctx, features, softmax_comparable=False, feature_width=2 * ctx.case.head_dim)
