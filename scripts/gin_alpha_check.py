"""gin_attention in bf16 on the CPU: the relative error of each gradient (α's among them) against the fp32 reference,
with the attention call in bf16 (the default) and in fp32 (``attention_dtype=float32``), seeds 0-3, causal, 1,024
tokens, 2 heads of 64 (the setting of tests/test_gin_precision.py). Writes ``OUT/alpha_grad.json``.

    python scripts/gin_alpha_check.py results/cpu-gin-alpha
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from attnbench.measure.gate import TOLERANCE
from attnbench.methods.analysis.gin import ALPHA_INDEX as ALPHA
from attnbench.methods.analysis.gin import gradient_errors as _errors


def main(out: str) -> None:
    rows = []
    for option in ("input", "float32"):
        for seed in range(4):
            out_err, grads = _errors("causal", seed=seed, params={"attention_dtype": option})
            rows.append({"attention_dtype": option, "seed": seed, "out_rel_err": out_err,
                         "alpha_grad_rel_err": grads[f"dparam{ALPHA}"], "dx_rel_err": grads["dx"],
                         "max_other_grad_rel_err": max(v for k, v in grads.items() if k != f"dparam{ALPHA}")})
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result = {"setting": "causal, 1024 tokens, 2 heads x 64, bf16 input, CPU", "bf16_gate": TOLERANCE["bfloat16"],
              "rows": rows}
    (folder / "alpha_grad.json").write_text(json.dumps(result, indent=1))
    for row in rows:
        print(f"{row['attention_dtype']:8s} seed {row['seed']}: alpha {row['alpha_grad_rel_err']:.4f}  "
              f"dx {row['dx_rel_err']:.4f}  others max {row['max_other_grad_rel_err']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/cpu-gin-alpha")
