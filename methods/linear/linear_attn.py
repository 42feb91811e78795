"""Linear attention (Katharopoulos et al., 2020, arXiv:2006.16236): the feature map ``φ(x) = elu(x) + 1``
on q and k, no 1/√d scale, ``eps = 1e-6`` (methods-spec §12a).

A different kernel from softmax (class N): rows say ``approx_err_na(different_operator)``; its quality
comes from the tasks. Forms: quadratic masked reference, chunked parallel form (``chunk``, default 128),
recurrent decode with an O(m · dv) state (m = head_dim). Hyper-parameters: ``chunk``, ``eps``,
``compute_dtype`` (matmul dtype of the chunked form, default float32; states are always fp32),
``reference_naive_max_pairs``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Capabilities, register_method
from .common import KERNELIZED_CAPS, expand_heads, kernelized


def elu_features(q, k, v, q_pos=None, k_pos=None):
    heads = q.shape[1]
    fq = F.elu(q.float()) + 1.0
    fk = F.elu(expand_heads(k, heads).float()) + 1.0
    return fq, fk, expand_heads(v, heads)


@register_method("linear_attn", Capabilities(**KERNELIZED_CAPS))
def build_linear_attn(ctx):
    """Linear attention, elu+1 features (chunked PyTorch form; O(d²) recurrent decode)."""
    return kernelized(ctx, elu_features, softmax_comparable=False)
