"""The ``superlinear`` package (0.1.0, concavity-ai, Triton) as a second backend of ``superlinear``.

Finding (wheel read, its pure-PyTorch search run on the CPU): the package computes the *same operator* as the
own method (methods-spec §1 was written from its code): stripes ``f(i) = floor(i^(1/p))`` for ``i > sw_index``,
raw-dot-product search ``q1 . k`` in fp32, top-k anchors, spans ``[a - ceil(b_back T^sigma), min(a +
ceil(b_fwd T^sigma), t, sw_start - 1)]``, window ``W = floor((s+1)^(1/p)) - 1``, one softmax (scale
``1/sqrt(d)``) per span over span U window, outputs mixed by ``softmax`` of the anchor scores (invalid anchors
-1e9, all invalid uniform). Parameters map one to one (same names, same defaults) with these restrictions of the
package, refused as ``unsupported`` with the reason: ``num_spans`` 2 or 3 only (its Triton search), ``search_power``
in (0, 1) (``1/p`` in 2..6 goes to its exact integer path ``inv_search_power_int``, other ``p`` to its float
path), ``backward_factor > 0``, ``span_power`` in (0, 1) when ``forward_factor > 0``, head dim <= 256. The own
method's ``search`` (``torch`` / ``triton``: which own search routes it) is not an option here: the package
always routes with its own search kernel, so the registry refuses ``method_options.superlinear_pkg.search``
(``not an option of superlinear_pkg``) rather than accept a value that would change nothing.

Differences to expect, all rounding: the package computes the span reach ``ceil(b T^sigma)`` in fp32 as
``exp(sigma log T)`` inside its Triton search (ours: float64 powers), so at lengths where ``b T^sigma`` is an
integer (T a perfect square for b=2, sigma=1/2) a span may start one key earlier; float ``search_power`` stripes
are ``floor`` of an fp32 power there. For that reason the gate's *routing* (anchors, span bounds) comes from the
package's own search (``superlinear.span_search``: its Triton kernel on CUDA, its PyTorch reference elsewhere),
and everything after the routing is the own readable reference (``superlinear_reference``: per-span patterns,
masked fp32 softmax, the gated sum with gates recomputed from ``q1 . k``), so the gate checks the package's span
attention and gating against ours on the same routing (the same rule as the own method: routing shared by fast
path and reference). That the package's search is ours is checked by the CPU tests (its reference search equals
``superlinear.search`` + ``span_bounds``), and at GPU scale by ``tests/test_superlinear_pkg.py``'s GPU test.

Entry point: ``superlinear.prefill_gqa`` (``attention/api.py::fused_prefill_with_swtriton_gqa``, the entry the
package's docstring recommends; it takes ``H_Q % H_KV == 0``, so equal heads as groups of one), not
``superlinear.prefill``. In 0.1.0 ``prefill`` sends equal head counts to ``attention/_prefill.py::
fused_prefill_with_swtriton``, which passes ``search_power=`` and ``inv_search_power_int=`` to
``span/_triton_precomputed_sw.py::fused_span_attention_with_precomputed_sw``, whose signature has neither: every
MHA call raises ``TypeError`` (a defect of the package, seen on an H200). The GQA path's span kernel
(``span/_triton_precomputed_sw_gqa.py::fused_span_attention_with_precomputed_sw_gqa``) takes both; the CPU tests
check that the defect is still there (and say to revisit this choice once it is gone) and that ``fn`` calls the
GQA entry with the mapped options.

Devices: CUDA only (``fused_span_triton`` asserts ``Q2.is_cuda``; its search kernel does not run under
``TRITON_INTERPRET``). Backward: yes (``SpanSearchWithValuesFn`` and ``FusedSpanTriton`` are autograd Functions;
gradients reach q1 and k through the gate values). Dtypes declared: bf16/fp16 (the kernels' intended use; fp32
not tried). Causal self-attention only; no cross; heads_kv == heads_q here (the package's GQA entry would take
fewer kv heads, the own reference does not).
"""
from __future__ import annotations

import torch

from ..contract import Extra, Prepared
from ..registry import Capabilities, Unsupported, register_method
from .superlinear import PKG_OPTIONS, read_options, span_bounds, span_pairs, superlinear_reference

INT_POWERS = (2, 3, 4, 5, 6)  # the package's exact integer stripe exponents (1 / search_power)


def package_kwargs(cfg: dict) -> dict:
    """The package's keyword arguments for the own method's validated options (``read_options``);
    ``Unsupported`` where the package cannot express them."""
    if cfg["num_spans"] not in (2, 3):
        raise Unsupported(f"the superlinear package's Triton search keeps 2 or 3 spans, not "
                          f"num_spans={cfg['num_spans']}")
    p = cfg["search_power"]
    if p >= 1.0:
        raise Unsupported(f"the superlinear package takes search_power in (0, 1), not {p}")
    if cfg["backward_factor"] <= 0:
        raise Unsupported("the superlinear package needs backward_factor > 0")
    sigma = cfg["span_power"]
    if cfg["forward_factor"] > 0 and not 0.0 < sigma < 1.0:
        raise Unsupported(f"the superlinear package takes span_power in (0, 1) with a forward_factor, not {sigma}")
    inv = round(1.0 / p)
    power = ({"inv_search_power_int": inv, "search_power": None} if inv in INT_POWERS and abs(1.0 / p - inv) < 1e-9
             else {"inv_search_power_int": None, "search_power": p})
    return dict(sw_index=cfg["sw_index"], num_spans=cfg["num_spans"], backward_factor=cfg["backward_factor"],
                forward_factor=cfg["forward_factor"], span_power=sigma, **power)


def package_routing(q1, k, cache_position, kwargs: dict, window: int):
    """Anchors and span bounds from the package's own search, in the own method's layout
    ``(anchors (-1 invalid), start, end (empty: start > end), sw_start)``."""
    import superlinear
    from superlinear.kernels.common import compute_qend_from_qanchor

    power = {n: kwargs[n] for n in ("search_power", "inv_search_power_int")}
    qstart, qanchor, _ = superlinear.span_search(
        q1.detach(), k.detach(), cache_position, sw_index=kwargs["sw_index"], k=kwargs["num_spans"],
        backward_factor=kwargs["backward_factor"], span_power=kwargs["span_power"], **power)
    qend = compute_qend_from_qanchor(qanchor, cache_position=cache_position, key_length=k.shape[2],
                                     sw_index=kwargs["sw_index"], forward_factor=kwargs["forward_factor"],
                                     span_power=kwargs["span_power"], **power)
    anchors = qanchor.long()
    valid = anchors >= 0
    length = k.shape[2]
    start = torch.where(valid, qstart.long(), torch.full_like(anchors, length))
    end = torch.where(valid, qend.long(), torch.full_like(anchors, -1))
    _, _, sw_start = span_bounds(anchors, window, 0.0, 0.0, 0.5)  # the window start only
    return anchors, start, end, sw_start


@register_method(
    "superlinear_pkg",
    Capabilities(family="sparse", exact=False, masks={"causal"}, causal_only=True, backward=True,
                 devices=("cuda",), dtypes=("float16", "bfloat16"), max_head_dim=256,
                 requires=("superlinear", "triton")),
    description="Superlinear attention (N=2) from the superlinear package (Triton prefill): the same operator "
                "as superlinear, gated against its reference on the package's routing",
    options=PKG_OPTIONS,  # not ``search``: the package searches with its own kernel (refused by the registry)
)
def build_superlinear_pkg(ctx):
    case = ctx.case
    cfg = read_options(ctx, "superlinear_pkg", with_search=False)
    kwargs = package_kwargs(cfg)
    if case.head_dim > 256:
        raise Unsupported("the superlinear package's search kernel takes head_dim <= 256")
    import superlinear

    length, batch, heads = case.seq_q, case.batch, case.heads_q
    cache_position = torch.arange(length, device=ctx.device)
    power = {n: kwargs[n] for n in ("search_power", "inv_search_power_int")}

    def fn(q, k, v, q1):  # the GQA entry also for equal heads: 0.1.0's MHA dispatch fails (module docstring)
        return superlinear.prefill_gqa(q1, q, k, v, cache_position=cache_position, sw_index=kwargs["sw_index"],
                                       num_spans=kwargs["num_spans"], backward_factor=kwargs["backward_factor"],
                                       forward_factor=kwargs["forward_factor"], span_power=kwargs["span_power"],
                                       **power)

    def routing(q1, k):
        return package_routing(q1, k, cache_position.to(k.device), kwargs, cfg["window"])

    def reference(q, k, v, q1, rows=None):
        return superlinear_reference(q, k, v, q1, routing, rows)

    def pairs(q, k, v, q1):
        _, start, end, sw_start = routing(q1, k)
        return span_pairs(start, end, sw_start, batch, heads, kwargs["num_spans"])

    def search_phase(q, k, v, q1):  # the package's own search kernel: the routing share of its call
        return superlinear.span_search(q1, k, cache_position, sw_index=kwargs["sw_index"], k=kwargs["num_spans"],
                                       backward_factor=kwargs["backward_factor"],
                                       span_power=kwargs["span_power"], **power)

    return Prepared(fn=fn, reference=reference, extras={"q1": Extra(shape=(batch, heads, length, case.head_dim))},
                    attended_pairs=pairs, phases={"routing": search_phase})
