"""Training-free quality of the attention call alone (§16.9): no model, the method on generated q, k, v.

``gaussian_approx``: distance from exact softmax attention, ||O - O_softmax|| / ||O_softmax||, on Gaussian q, k, v
whose logits have standard deviation 1 and 3 (breakdown), full mask. ``planted_recall``: causal; each query i has
one key planted at distance d behind it (k_{i-d} = alpha * q_i / |q_i| + noise, alpha = ln(length) + 8, so that
exact attention finds it); recall is the share of queries whose output is closer to the
planted key's value than to any other visible value, per distance (breakdown) and averaged. Meant for approximate
methods (does a routed or sparse method find far keys?); exact methods give the line to compare with (recall 1).
"""
from __future__ import annotations

import math
import zlib

import torch

from .model import build_method, task_case
from .registry import Task, register_task
from .train import Outcome

PROBE_DEFAULTS = {"seq_lens": [1024], "heads": 4, "head_dim": 64, "batch": 1}


class _Probe(Task):
    kind = "probe"
    defaults = dict(PROBE_DEFAULTS)

    def setup(self):
        self.heads = self.int_param("heads")
        self.head_dim = self.int_param("head_dim", 2)
        self.batch = self.int_param("batch")
        self.params.setdefault("d_model", self.heads * self.head_dim)

    def _method(self, method, seed, dtype, device, options, method_params):
        case = task_case(method=method, mask=self.mask_name, mask_name=self.mask_name, batch=self.batch,
                             heads_q=self.heads, heads_kv=self.heads, seq_q=self.seq, seq_kv=self.seq,
                             head_dim=self.head_dim, dtype=dtype, mode="fwd", seed=seed, device=device)
        prepared, caps = build_method(case, torch.device(device), options, method_params)
        return case, prepared, caps

    def _call(self, prepared, caps, q, k, v, seed, dtype, shares: list | None = None):
        """The method's output for q, k, v (float); with ``shares``, the share of the visible pairs it attended
        (its own ``attended_pairs`` count, where it declares one) is appended there."""
        bshd = caps.input_layout == "bshd"
        args = [t.to(getattr(torch, dtype)) for t in (q, k, v)]
        if bshd:
            args = [t.transpose(1, 2).contiguous() for t in args]
        kwargs = {}
        for name, extra in prepared.extras.items():
            gen = torch.Generator(device=q.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            kwargs[name] = extra.make(gen, q.device, args[0].dtype)
        with torch.no_grad():
            if prepared.prepare is not None:
                kwargs.update(prepared.prepare(*args, **kwargs) or {})
            out = prepared.fn(*args, **kwargs)
            if shares is not None and prepared.attended_pairs is not None:
                pairs = int(prepared.attended_pairs(*args, **kwargs))
                shares.append(pairs / (self._bound(q.device).visible_pairs() * q.shape[0] * q.shape[1]))
        if bshd:
            out = out.transpose(1, 2)
        return out.float()

    @staticmethod
    def _outcome(breakdown: dict, shares: list) -> Outcome:
        """The probe's row; ``extras.attended_share``: the share of the visible (query, key) pairs the method
        attended (its own count, mean over the calls), where it declares one — 1 means it attended every pair at
        this length, so its score is exact attention's, not its sparsity's."""
        extras = {"attended_share": sum(shares) / len(shares)} if shares else {}
        return Outcome(status="ok", value=sum(breakdown.values()) / len(breakdown), breakdown=breakdown,
                       extras=extras)

    def _bound(self, device):
        from attnbench import masks

        return masks.make_mask(self.mask_name).bind(self.seq, self.seq).to(device)


@register_task("gaussian_approx")
class GaussianApprox(_Probe):
    """Distance from exact softmax attention on Gaussian q, k, v (logit std 1 and 3), full mask."""

    pattern = "noncausal_self"
    metric = "approx_err"
    higher_is_better = False

    def probe(self, method, seed=0, dtype="float32", device="cpu", options=None, method_params=None) -> Outcome:
        from attnbench.methods.exact.reference import reference_attention

        _, prepared, caps = self._method(method, seed, dtype, device, dict(options or {}), method_params or {})
        gen = torch.Generator(device=device).manual_seed(seed)
        shape = (self.batch, self.heads, self.seq, self.head_dim)
        breakdown, shares = {}, []
        for std in (1.0, 3.0):
            # q.k / sqrt(D) with q, k ~ N(0, s^2) has std s^2: s = sqrt(std)
            q, k = (torch.randn(shape, generator=gen, device=device) * math.sqrt(std) for _ in range(2))
            v = torch.randn(shape, generator=gen, device=device)
            out = self._call(prepared, caps, q, k, v, seed, dtype, shares)
            ref, _ = reference_attention(q, k, v, self._bound(device))
            breakdown[f"logit_std={std:g}"] = float((out - ref).norm() / ref.norm())
        return self._outcome(breakdown, shares)


@register_task("planted_recall")
class PlantedRecall(_Probe):
    """Recall of a key planted at distance d behind each query (causal), per distance."""

    pattern = "causal_self"
    metric = "recall"
    defaults = {**PROBE_DEFAULTS, "distances": [1, 16, 256, 1000]}

    def setup(self):
        super().setup()
        distances = self.params["distances"]
        if not distances or any(not isinstance(d, int) or isinstance(d, bool) or not 1 <= d < self.seq
                                for d in distances):
            raise self.error("distances", f"must be integers in [1, {self.seq - 1}] (below the length), got {distances!r}")

    def probe(self, method, seed=0, dtype="float32", device="cpu", options=None, method_params=None) -> Outcome:
        _, prepared, caps = self._method(method, seed, dtype, device, dict(options or {}), method_params or {})
        gen = torch.Generator(device=device).manual_seed(seed)
        shape = (self.batch, self.heads, self.seq, self.head_dim)
        alpha = math.log(self.seq) + 8.0  # the planted logit, against noise logits of std ~1
        breakdown, shares = {}, []
        for distance in self.params["distances"]:
            q = torch.randn(shape, generator=gen, device=device)
            noise = torch.randn(shape, generator=gen, device=device)
            k = noise.clone()
            unit = q / q.norm(dim=-1, keepdim=True)
            k[:, :, : self.seq - distance] += alpha * unit[:, :, distance:]  # key j planted for query j + d
            v = torch.randn(shape, generator=gen, device=device)
            out = self._call(prepared, caps, q, k, v, seed, dtype, shares)
            # which visible value is the output closest to (by dot product)? causal: keys j <= i
            scores = out @ v.transpose(-1, -2)
            visible = torch.ones(self.seq, self.seq, dtype=torch.bool, device=device).tril()
            picked = scores.masked_fill(~visible, float("-inf")).argmax(-1)  # [B, H, S]
            queries = torch.arange(distance, self.seq, device=device)
            hit = picked[:, :, distance:] == (queries - distance)
            breakdown[f"d={distance}"] = float(hit.float().mean())
        return self._outcome(breakdown, shares)
