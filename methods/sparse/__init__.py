"""Routed, sparse and local attention methods (issue 9; specs in methods-spec §1-6 and CAB's efficient set).

| method | file | forms | fast path |
|---|---|---|---|
| ``superlinear`` | superlinear.py | causal | FlexAttention per span, per-call BlockMask from the search |
| ``superlinear_pkg`` | superlinear_pkg.py | causal, CUDA, needs ``superlinear`` | the package's Triton prefill (same operator) |
| ``biformer``, ``biformer_2d``, ``biformer_layer`` | biformer.py | full/causal/cross; 2-D grid; layer + LCE | gathered regions through SDPA |
| ``routing`` | routing.py | full/causal/cross | gathered clusters through SDPA, scattered back |
| ``combiner_fixed``, ``combiner_axial``, ``combiner_logsparse`` | combiner.py | full/causal; causal | FlexAttention over augmented keys; two FlexAttention parts merged by LSE; shifted broadcasts |
| ``halo``, ``halo_2d`` | halo.py | full/causal; 2-D grid | unfolded windows through SDPA |
| ``sparsifiner`` | sparsifiner.py | full/cross (<= max_seq) | SDPA with the predicted boolean mask |
| ``probsparse`` | probsparse.py | full/cross | SDPA on the active queries |
| ``long_short`` | long_short.py | full/causal | FlexAttention over augmented keys |

Every method here is approximate (``exact=False``): its fast path is gated against its own readable fp32
reference (the method's pattern or weights built explicitly, then a masked softmax; ``rows=`` computes a sample
of query rows for long cases), and its distance from exact softmax attention is recorded as ``approx_err``.
Data-dependent decisions (routing, clustering, top-k) are made by one function from fp32 scores, shared by
fast path and reference, so the gate compares the same routing. Shared pieces: ``common``.
"""
from . import biformer, combiner, halo, long_short, probsparse, routing, sparsifiner, superlinear, superlinear_pkg  # noqa: F401
