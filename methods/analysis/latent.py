"""Latent cross-attention pooling (Tang & Yang, arXiv:2409.02727; methods-spec-3 §4): the kernel shape and
the readouts, written from the spec (nothing taken from yixuantt/PoolingAndAttn).

Kernel ``latent_xattn`` (class E): noncausal cross-attention of ``m`` queries (learned latents in the pooler)
over a long sequence, ``seq_q ≪ seq_kv``, full mask: SDPA with PyTorch's own backend choice (math or
memory-efficient where FlashAttention refuses, e.g. head dim 2048: the paper's pooler uses 32 heads of 2048).
``latent_xattn_flash`` forces the flash backend: the cases it declines (head dim > 256, ...) are
``unsupported`` rows with PyTorch's reason, not errors. Both take an optional ``key_padding_mask``
(bool ``[B, Skv]``, True = a real token) — the released pooler passes none, so left padding is attended;
:func:`latent_cross_attention` is that call, :func:`latent_cross_reference` its fp32 readable form.

Readouts (``history -> vector``: per-layer states ``[B, L, D]`` and a key padding mask -> ``[B, D]``), for a
classification model (``readout`` option of ``attnbench.tasks.model``):

* ``pool_eos``: the state of the last real token (the EOS) of the last layer;
* ``pool_mean``: the padding-masked token mean of the last layer;
* ``pool_latent_last``: latents attend to the last layer's real tokens (the design M2/M4 names; the
  released M2 attends to the last token only, which makes its attention weight trivially 1);
* ``pool_latent_multilayer``: latents attend to one summary per layer (the EOS state, or the masked mean:
  ``summary``) plus a learned layer-index embedding ``E_layer``;
* ``histograph_readout`` (HISTOGRAPH, §6; :mod:`.histograph`): depth attention over each token's layer states
  (the last layer as the query, signed normalisation) plus one node self-attention, then the masked mean.

The latent pooler: ``O = Lat + W_o·MHA(Q = W_q LN(Lat), K, V = W_kv LN(C))``, ``O ← O + FF(LN O)`` (GEGLU ×4),
the vector is the mean over the latents (the paper L2-normalises it for retrieval; ``normalize``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..exact.sdpa import FLASH_DTYPES  # the flash backend's dtypes per device
from ..registry import Capabilities, Unsupported, register_method

DECLINES = ("No available kernel",)


def latent_cross_attention(q, k, v, key_padding_mask=None):
    """Noncausal cross-attention; ``key_padding_mask`` bool ``[B, Skv]`` (True: attend). Padded keys get weight 0."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def latent_cross_reference(q, k, v, key_padding_mask=None):
    """The same, materialised, in q's dtype (readable)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _build(backend):
    def build(ctx):
        if not ctx.mask.full:
            raise Unsupported(f"{ctx.case.method} is noncausal cross-attention (full mask only), not {ctx.mask.label}")

        def fn(q, k, v, key_padding_mask=None):
            if backend is None:
                return latent_cross_attention(q, k, v, key_padding_mask)
            with sdpa_kernel([backend]):
                return latent_cross_attention(q, k, v, key_padding_mask)

        return fn

    return build


_CAPS = dict(family="analysis", exact=True, masks={"full"}, cross=True, gqa=True, backward=True, declines=DECLINES)
register_method("latent_xattn", Capabilities(**_CAPS),
                description="latent cross-attention pooling kernel: m queries over a long sequence, noncausal, "
                            "key padding mask (SDPA, PyTorch's backend choice)", options=())(_build(None))
register_method("latent_xattn_flash", Capabilities(**_CAPS, dtypes_by_device=FLASH_DTYPES),
                description="latent_xattn forced onto the flash backend (declined cases are unsupported rows)",
                options=())(_build(SDPBackend.FLASH_ATTENTION))


# ---- readouts ----------------------------------------------------------------------------------------------------
def _valid(history, key_padding_mask):
    x = history[-1]
    if key_padding_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return key_padding_mask.bool()


def last_valid(x, valid):
    """The state of each sequence's last real token ``[B, D]``."""
    index = (valid.long() * torch.arange(1, valid.shape[1] + 1, device=x.device)).argmax(1)
    return x[torch.arange(x.shape[0], device=x.device), index]


def masked_mean(x, valid):
    w = valid.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class PoolEOS(nn.Module):
    def forward(self, history, key_padding_mask=None):
        return last_valid(history[-1], _valid(history, key_padding_mask))


class PoolMean(nn.Module):
    def forward(self, history, key_padding_mask=None):
        return masked_mean(history[-1], _valid(history, key_padding_mask))


class GEGLU(nn.Module):
    def __init__(self, d: int, mult: int = 4):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * mult * d), nn.Linear(mult * d, d)

    def forward(self, x):
        a, gate = self.up(x).chunk(2, dim=-1)
        return self.down(a * F.gelu(gate))


class LatentPooler(nn.Module):
    """m learned latents cross-attend to a context ``C [B, Lk, D]`` (padding-masked), then a GEGLU FF; mean."""

    def __init__(self, d: int, latents: int = 8, heads: int = 4, head_dim: int | None = None, normalize=False):
        super().__init__()
        head_dim = head_dim or max(1, d // heads)
        inner = heads * head_dim
        self.heads, self.head_dim, self.normalize = heads, head_dim, normalize
        self.latents = nn.Parameter(torch.randn(latents, d) * d ** -0.5)
        self.norm_lat, self.norm_ctx, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, inner, bias=False)
        self.kv = nn.Linear(d, 2 * inner, bias=False)
        self.o = nn.Linear(inner, d, bias=False)
        self.ff = GEGLU(d)

    def pool(self, context, valid=None):
        batch = context.shape[0]
        lat = self.latents[None].expand(batch, -1, -1)
        q = self.q(self.norm_lat(lat)).view(batch, -1, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(self.norm_ctx(context)).view(batch, context.shape[1], 2, self.heads, self.head_dim).unbind(2)
        out = latent_cross_attention(q, k.transpose(1, 2), v.transpose(1, 2), valid)
        o = lat + self.o(out.transpose(1, 2).reshape(batch, lat.shape[1], -1))
        o = o + self.ff(self.norm_ff(o))
        vec = o.mean(1)
        return F.normalize(vec, dim=-1) if self.normalize else vec


class PoolLatentLast(LatentPooler):
    def forward(self, history, key_padding_mask=None):
        return self.pool(history[-1], _valid(history, key_padding_mask))


class PoolLatentMultilayer(LatentPooler):
    """Context = one summary per layer (``summary``: ``eos`` or ``mean``) + a learned layer-index embedding."""

    def __init__(self, d: int, layers: int, summary: str = "mean", **kw):
        super().__init__(d, **kw)
        if summary not in ("eos", "mean"):
            raise ValueError(f"summary must be 'eos' or 'mean', got {summary!r}")
        self.summary = summary
        self.layer_embedding = nn.Parameter(torch.zeros(layers, d))

    def forward(self, history, key_padding_mask=None):
        valid = _valid(history, key_padding_mask)
        take = last_valid if self.summary == "eos" else masked_mean
        context = torch.stack([take(h, valid) for h in history], dim=1)  # [B, layers, D]
        if context.shape[1] != self.layer_embedding.shape[0]:
            raise ValueError(f"history has {context.shape[1]} layers, the pooler was built for "
                             f"{self.layer_embedding.shape[0]}")
        return self.pool(context + self.layer_embedding[None])


READOUTS = ("pool_eos", "pool_mean", "pool_latent_last", "pool_latent_multilayer", "histograph_readout")


def make_readout(name: str, d: int, layers: int, heads: int = 4, latents: int = 8) -> nn.Module:
    """A ``history -> vector`` readout by name (``READOUTS``)."""
    if name == "pool_eos":
        return PoolEOS()
    if name == "pool_mean":
        return PoolMean()
    if name == "pool_latent_last":
        return PoolLatentLast(d, latents=latents, heads=heads)
    if name == "pool_latent_multilayer":
        return PoolLatentMultilayer(d, layers, latents=latents, heads=heads)
    if name == "histograph_readout":  # depth attention + node self-attention (HISTOGRAPH, §6)
        from .histograph import HistographReadout

        return HistographReadout(d, layers, heads=heads)
    raise ValueError(f"readout must be one of {READOUTS}, got {name!r}")
