"""Every mask runs through the exact methods on the CPU and matches the fp32 reference (fwd and fwd_bwd)."""
from __future__ import annotations

import pytest

from attnbench import masks
from attnbench.execute.case import CaseRunner
from attnbench.config.plan import Case

SMALL = {
    "full": "full", "causal": "causal", "decode": "decode",
    "sliding_window": "sliding_window(left=8,right=3)",
    "dilated_sliding_window": "dilated_sliding_window(left=12,dilation=2)",
    "chunked_local": "chunked_local(chunk=16)",
    "document": "document(lengths=[20,30,14])",
    "prefix_lm": "prefix_lm(prefix=10)",
    "document_prefix_lm": "document_prefix_lm(lengths=[20,30,14])",
    "shared_question": "shared_question(question=16,num_answers=3)",
    "block_causal": "block_causal(block=8)",
    "block_causal_document": "block_causal_document(lengths=[24,40],frame=8)",
    "longformer": "longformer(left=6,right=6,global_tokens=4)",
    "bigbird": "bigbird(block=8,random_blocks=1)",
    "sparse_strided": "sparse_strided(stride=8)",
    "sparse_fixed": "sparse_fixed(stride=8,summary=2)",
    "random_block_sparse": "random_block_sparse(block=8,density=0.3)",
}
TIMING = {"budget_ms": 1, "warmup_ms": 0, "min_reps": 1, "max_reps": 2, "flush_l2": False}


def test_every_registered_mask_has_a_small_entry_here():
    builtin = {name for name, cls in masks.MASKS.items() if cls.__module__.startswith("attnbench.masks.")}
    assert builtin <= set(SMALL), f"add a small entry for {sorted(builtin - set(SMALL))}"


@pytest.mark.parametrize("entry", sorted(SMALL.values()))
def test_exact_methods_match_the_reference_on_every_mask(entry):
    spec = masks.make_mask(entry)
    seq_q = 4 if spec.name == "decode" else 64
    runner = CaseRunner("cpu", {"timing": TIMING, "dense_mask_bytes": 1 << 30, "materialize_bytes": 1 << 32})
    for method in ("eager", "sdpa_math", "reference"):
        for mode in ("fwd", "fwd_bwd"):
            case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=2, heads_kv=1,
                        seq_q=seq_q, seq_kv=64, head_dim=8, dtype="float32", mode=mode)
            row = runner.run(case)
            assert row["status"] == "ok", (entry, method, mode, row["reason"])
