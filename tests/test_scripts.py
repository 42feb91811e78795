"""The helper scripts that turn committed runs into README tables."""
from __future__ import annotations

import pandas as pd

from scriptload import load_script as load


def test_mask_winners_ranks_exact_ok_rows_and_gives_the_margin():
    winners = load("mask_winners").winners
    rows = pd.DataFrame([
        # mask, method, mode, ms, status, exact
        ("causal", "sdpa_cudnn", "fwd", 2.0, "ok", True),
        ("causal", "flex", "fwd", 3.0, "ok", True),
        ("causal", "approx", "fwd", 0.5, "ok", False),  # approximate: never a winner here
        ("causal", "buggy", "fwd", 0.1, "wrong", True),  # not ok: never a winner
        ("causal", "flex", "fwd_bwd", 9.0, "ok", True),
    ], columns=["mask", "method", "mode", "ms_median", "status", "exact"])
    rows["seq_q"], rows["density"], rows["tflops"] = 4096, 0.5, 100.0
    lines = winners(rows, 4096)
    assert lines[2] == ("| `causal` | 0.500 | sdpa_cudnn, 2.0 ms, 100 | 1.50× over flex | — | "
                        "flex, 9.0 ms, 100 | only one | no cuDNN row |")
    # the margin over cuDNN's dense-bias row when another method wins
    rows.loc[rows["method"] == "sdpa_cudnn", "ms_median"] = 6.0
    assert winners(rows, 4096)[2].startswith("| `causal` | 0.500 | flex, 3.0 ms, 100 | 2.00× over sdpa_cudnn | 2.00× |")
    assert winners(rows, 8192)[2:] == []
