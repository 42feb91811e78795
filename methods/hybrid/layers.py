"""Pieces shared by the layer-form methods (``form="layer"``, x ``[batch, seq, heads·head_dim]``): seeded
parameters, depthwise (causal or centred) 1-D convolutions in a fast and a readable form, norms."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ParamMaker:
    """Learnable tensors drawn from one seeded generator (the case's seed), kept in creation order."""

    def __init__(self, seed: int, device):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = device
        self.tensors: list[torch.Tensor] = []

    def randn(self, *shape, std: float = 1.0, mean: float = 0.0):
        t = torch.randn(*shape, generator=self.generator, device=self.device) * std + mean
        return self.keep(t)

    def uniform(self, *shape, low: float = 0.0, high: float = 1.0):
        t = torch.rand(*shape, generator=self.generator, device=self.device) * (high - low) + low
        return self.keep(t)

    def const(self, *shape, value: float):
        return self.keep(torch.full(shape, float(value), device=self.device))

    def keep(self, t):
        t = t.requires_grad_(True)
        self.tensors.append(t)
        return t


def dwconv(x, weight, causal: bool):
    """Depthwise conv over the sequence: x [B, L, C], weight [C, k]; causal pads k-1 on the left, else
    (k-1)//2 left and k//2 right (the same length out). Fast form (``F.conv1d``)."""
    k = weight.shape[-1]
    left, right = (k - 1, 0) if causal else ((k - 1) // 2, k // 2)
    xt = F.pad(x.transpose(1, 2), (left, right))
    return F.conv1d(xt, weight[:, None, :].to(x.dtype), groups=x.shape[-1]).transpose(1, 2)


def dwconv_reference(x, weight, causal: bool):
    """The same convolution as a sum of shifted copies (readable)."""
    k = weight.shape[-1]
    left = k - 1 if causal else (k - 1) // 2
    length = x.shape[1]
    out = torch.zeros_like(x)
    for tap in range(k):
        shift = tap - left  # output t reads input t + shift
        lo, hi = max(0, -shift), min(length, length - shift)
        if lo < hi:
            out[:, lo:hi] = out[:, lo:hi] + x[:, lo + shift:hi + shift] * weight[:, tap].to(x.dtype)
    return out


def rms_norm(x, eps: float = 1e-6):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def split_heads(t, heads: int):
    batch, length, width = t.shape
    return t.view(batch, length, heads, width // heads).transpose(1, 2)


def merge_heads(t):
    batch, heads, length, dim = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * dim)
