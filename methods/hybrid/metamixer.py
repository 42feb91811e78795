"""MetaMixer / FFNified attention (Yun, Lee, Ro, arXiv:2406.02021), §13, as a 1-D token mixer (layer form).

``Y = DWConv_k2(GELU(DWConv_k1(BN(PWConv(X)))))``: the 1×1 projection plays the query, the first large
depthwise kernel the query–key interaction, GELU the softmax, the second depthwise kernel the value
aggregation. BatchNorm in inference form (a per-channel affine). Causal: both convolutions left-padded;
full: centred. No Q/K/V, no attention matrix: a different operator (class N). Forms: ``F.conv1d`` in fp32
(fast; in the working dtype the four roundings reach ~0.6 % in bf16, too near the gate) and a sum of shifted copies in fp32 (reference;
its ``rows=`` form, :func:`mixer_rows`, computes long cases' sampled tokens from their windows). FLOPs ``2·L·C² + 2·L·C·(k1+k2)``.
Hyper-parameters: ``k1``, ``k2`` (default 7 each; odd for the full mask).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contract import Prepared
from ..linear.common import mask_mode, param_int
from ..registry import Capabilities, Unsupported, register_method
from .layers import ParamMaker, dwconv, dwconv_reference


def mixer_rows(x, rows, w_pw, gamma, beta, c1, c2, causal: bool, *, pad: bool = True):
    """The reference at tokens ``rows`` only (``[B, len(rows), C]``, fp32), for long cases: each row reads the
    ``k1 + k2 − 1`` tokens its two convolutions reach; the projection runs on those, positions outside the
    sequence are zero before each convolution (as the full form's padding), and the two depthwise
    convolutions run on that window (:func:`dwconv_reference`). O(len(rows) · (k1 + k2) · C) memory.
    ``pad=False`` (positions outside the sequence not zeroed: the projection of a clamped token there) is a
    deliberately broken variant for the tests' negative control."""
    k1, k2 = c1.shape[-1], c2.shape[-1]
    left1, left2 = (k1 - 1, k2 - 1) if causal else ((k1 - 1) // 2, (k2 - 1) // 2)
    right1, right2 = k1 - 1 - left1, k2 - 1 - left2
    length = x.shape[1]
    rows = rows.to(x.device).long()
    rel = torch.arange(-(left1 + left2), right1 + right2 + 1, device=x.device)  # window positions around a row
    pos = rows[:, None] + rel[None, :]  # [r, W]
    inside = (pos >= 0) & (pos < length)
    xw = x[:, pos.clamp(0, length - 1)].float()  # [B, r, W, C]
    h = (xw @ w_pw.float()) * gamma.float() + beta.float()
    if pad:
        h = torch.where(inside[None, :, :, None], h, torch.zeros_like(h))
    batch, count, window, width = h.shape
    g = F.gelu(dwconv_reference(h.reshape(batch * count, window, width), c1.float(), causal))
    if pad:
        g = torch.where(inside.repeat(batch, 1)[..., None], g, torch.zeros_like(g))
    y = dwconv_reference(g, c2.float(), causal)  # exact at the positions whose taps stay inside the window
    return y[:, left1 + left2].reshape(batch, count, width)


@register_method("metamixer", Capabilities(family="hybrid", exact=False, form="layer", masks={"full", "causal"},
                                            backward=True, trainable=True), options=("k1", "k2"))
def build_metamixer(ctx):
    """MetaMixer FFNified attention: pointwise projection, depthwise conv, GELU, depthwise conv (layer)."""
    causal, _ = mask_mode(ctx)
    case = ctx.case
    if case.seq_q != case.seq_kv:
        raise Unsupported("metamixer is a self-attention token mixer (seq_q == seq_kv)")
    k1 = param_int(ctx, "k1", 7, minimum=1, maximum=1023)
    k2 = param_int(ctx, "k2", 7, minimum=1, maximum=1023)
    if not causal and (k1 % 2 == 0 or k2 % 2 == 0):
        raise ValueError(f"method_options.metamixer.k1/k2: must be odd for a centred (full-mask) mixer, got {k1}, {k2}")
    width = case.heads_q * case.head_dim
    make = ParamMaker(case.seed, ctx.device)
    w_pw = make.randn(width, width, std=width ** -0.5)
    gamma, beta = make.const(width, value=1.0), make.const(width, value=0.0)
    c1, c2 = make.randn(width, k1, std=k1 ** -0.5), make.randn(width, k2, std=k2 ** -0.5)

    def fast(x):
        h = (x.float() @ w_pw) * gamma + beta
        return dwconv(F.gelu(dwconv(h, c1, causal)), c2, causal).to(x.dtype)

    def reference(x, rows=None):
        if rows is not None:  # a long case's sampled tokens: only the window each one reads
            return mixer_rows(x, rows, w_pw, gamma, beta, c1, c2, causal)
        h = (x @ w_pw.float()) * gamma.float() + beta.float()
        return dwconv_reference(F.gelu(dwconv_reference(h, c1.float(), causal)), c2.float(), causal)

    flops = case.batch * case.seq_q * (2.0 * width * width + 2.0 * width * (k1 + k2))
    return Prepared(fn=fast, reference=reference, parameters=make.tensors, flops=flops, softmax_comparable=False)
