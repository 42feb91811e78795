"""Sparse-GIN adapter (Buehler, arXiv:2501.02393, §1b of methods-spec-3): a GIN over a frozen pretrained
encoder's thresholded attention graph, added after each attention sub-layer. Written from the spec; nothing taken
from lamm-mit/Graph-Aware-Transformers (and no torch-geometric: the edge list is scattered with ``index_add_``).

Per layer, from the frozen attention probabilities ``P [B, H, L, L]`` (row: query i, column: key j):

1. ``A = clamp(sum_h P_h, max=1)``, times the padding mask (both ends real), ``A <- sigmoid(10 (A - 0.1))``, entries
   ``<= 0.6`` zeroed, ``tril`` when ``causal`` (diagonal kept): :func:`adjacency`;
2. the edges: **intended** (``edge_mode='intended'``): a message ``j -> i`` with weight ``w_ij`` for every non-zero
   ``A_ij``; **released** (``edge_mode='released'``, the released code reproduced): the non-zero ``(i, j)`` used as
   PyG's ``edge_index`` (source i, target j, messages i -> j) and then filtered to ``source <= target`` — with the
   ``tril`` that leaves self-loops only (a token-wise adapter gated by the diagonal weight): :func:`edges`;
3. ``g = W_out PReLU(GIN(W_in h))`` with one GIN layer ``u_i = eps x_i + sum_{j->i} w_ij x_j``,
   ``z = Lin2(ReLU(Lin1 u)) + u`` (the spec's ε·x form; dropout left out: the probe is deterministic);
4. ``h <- h + lambda_l RMSNorm(g)``, ``lambda_l`` a trainable scalar per layer initialised linearly from 0 (first
   layer) to 0.5 (last). At ``lambda = 0`` the layer is the frozen base layer bit for bit.

:func:`aggregate` is the sparse scatter over the edge list; :func:`aggregate_reference` the dense form
(``A @ x`` intended, ``diag(A) * x`` released).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EDGE_MODES = ("intended", "released")


def adjacency(p: torch.Tensor, valid: torch.Tensor | None = None, *, causal: bool = True, alpha: float = 10.0,
              threshold: float = 0.1, epsilon: float = 0.6) -> torch.Tensor:
    """Edge weights ``A [B, L, L]`` (``A[b, i, j]``: query i's summed attention to key j, transformed)."""
    a = p.float().sum(1).clamp(max=1.0)
    if valid is not None:
        a = a * (valid[:, :, None] & valid[:, None, :]).to(a.dtype)
    a = torch.sigmoid(alpha * (a - threshold))
    a = torch.where(a > epsilon, a, torch.zeros((), dtype=a.dtype, device=a.device))
    return a.tril() if causal else a


def edges(a: torch.Tensor, mode: str = "intended"):
    """``(batch, source, target, weight)`` of the messages over ``A``'s non-zero entries (see the module doc)."""
    if mode not in EDGE_MODES:
        raise ValueError(f"edge_mode must be one of {EDGE_MODES}, got {mode!r}")
    b, i, j = a.nonzero(as_tuple=True)
    weight = a[b, i, j]
    if mode == "intended":
        return b, j, i, weight  # key j sends to query i
    keep = i <= j  # the released code: edge_index = (i, j), flow source -> target, then source <= target kept
    return b[keep], i[keep], j[keep], weight[keep]


def aggregate(x: torch.Tensor, edge_list) -> torch.Tensor:
    """``sum_{s -> t} w x_s`` at every target ``t`` (sparse scatter), ``x [B, L, D]``."""
    b, source, target, weight = edge_list
    out = torch.zeros_like(x).reshape(-1, x.shape[-1])
    flat_target = b * x.shape[1] + target
    return out.index_add(0, flat_target, weight[:, None].to(x.dtype) * x[b, source]).view_as(x)


def aggregate_reference(x: torch.Tensor, a: torch.Tensor, mode: str = "intended") -> torch.Tensor:
    """The dense form: ``A @ x`` (intended) or ``diag(A) * x`` (released: self-loops only, once ``tril``)."""
    if mode == "intended":
        return a.to(x.dtype) @ x
    return torch.diagonal(a, dim1=-2, dim2=-1)[..., None].to(x.dtype) * x


class GINBlock(nn.Module):
    """``g = W_out PReLU(GIN(W_in h))`` for one layer."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_in, self.w_out = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.lin1, self.lin2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.eps = nn.Parameter(torch.zeros(()))
        self.act = nn.PReLU()

    def forward(self, h: torch.Tensor, a: torch.Tensor, mode: str, dense: bool = False) -> torch.Tensor:
        x = self.w_in(h)
        agg = aggregate_reference(x, a, mode) if dense else aggregate(x, edges(a, mode))
        u = self.eps * x + agg
        z = self.lin2(F.relu(self.lin1(u))) + u
        return self.w_out(self.act(z))


class SparseGINAdapter(nn.Module):
    """One GIN block, one RMSNorm weight and one lambda per layer of the frozen encoder."""

    def __init__(self, d: int, layers: int, hidden: int = 155, edge_mode: str = "intended", causal: bool = True,
                 lambda_first: float = 0.0, lambda_last: float = 0.5):
        super().__init__()
        if edge_mode not in EDGE_MODES:
            raise ValueError(f"edge_mode must be one of {EDGE_MODES}, got {edge_mode!r}")
        self.edge_mode, self.causal = edge_mode, causal
        self.blocks = nn.ModuleList(GINBlock(d, hidden) for _ in range(layers))
        self.norm_weight = nn.Parameter(torch.ones(layers, d))
        self.lambdas = nn.Parameter(torch.linspace(lambda_first, lambda_last, layers) if layers > 1
                                    else torch.tensor([lambda_last]))
        self.edge_counts = {"edges": 0, "self_loops": 0}

    def layer(self, index: int, h: torch.Tensor, p: torch.Tensor, valid: torch.Tensor | None = None,
              dense: bool = False) -> torch.Tensor:
        """``h + lambda RMSNorm(g)`` for layer ``index`` on the frozen attention probabilities ``p``."""
        a = adjacency(p, valid, causal=self.causal)
        b, source, target, _ = edges(a, self.edge_mode)
        self.edge_counts["edges"] += int(source.numel())
        self.edge_counts["self_loops"] += int((source == target).sum())
        g = self.blocks[index](h, a, self.edge_mode, dense=dense)
        g = F.rms_norm(g, (g.shape[-1],), self.norm_weight[index], eps=1e-6)
        return h + self.lambdas[index] * g
