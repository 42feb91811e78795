"""Routed, sparse and local attention methods (issue 9; specs in methods-spec §1-6 and CAB's efficient set).

Every method here is approximate (``exact=False``): its fast path is gated against its own readable fp32
reference (the method's pattern or weights built explicitly, then a masked softmax), and its distance from
exact softmax attention is recorded as ``approx_err``. Data-dependent decisions (routing, clustering, top-k)
are made by one function from fp32 scores, shared by fast path and reference, so the gate compares the same
routing. Shared pieces: ``common``.
"""
from . import biformer  # noqa: F401
from . import halo  # noqa: F401
from . import routing  # noqa: F401
from . import combiner  # noqa: F401
from . import long_short, probsparse, sparsifiner  # noqa: F401
from . import superlinear  # noqa: F401
