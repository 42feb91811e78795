#!/usr/bin/env bash
# One call on the 1-GPU kind (nvidia-h200): the routed/summary methods' implementations
# (sweep=sparse_impl_routed), one run per implementation under $OUT/, each invocation capped (the harness
# resumes; a cut invocation keeps its finished rows). Aimed at ~5 minutes of GPU time: install ~20 s, a GPU
# smoke of the combiner impls and of biformer impl=flex at 1K (fwd, fwd_bwd, capped 90 + 60 s), invocations
# capped 80 + 25 + 60 + 40 s (biformer impl=flex: a compile per case, so 40 s may cut it; it resumes).
# Before the call: mkdir -p .whl && cp ../shared/device/wheels/*.whl .whl/ && pip wheel --no-deps -w .whl .
# Afterwards: copy $OUT/h200-routed-* into results/; `python scripts/sparse_summary.py` / compare them.
set -u
OUT=${OUT:-$PWD/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import attnbench" || { echo "attnbench wheel missing from .whl/"; exit 1; }
export PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=1

# 0. smoke: each combiner impl against its reference in bf16 (fwd, fwd_bwd), 1K
timeout -k 5 90 python3 -m pytest -m gpu -q -p no:cacheprovider -k "impl and combiner" tests/test_sparse_gpu.py \
  > "$OUT/gpu-tests-routed.txt" 2>&1
tail -n 15 "$OUT/gpu-tests-routed.txt"
# biformer impl=flex (BlockMask from the routed regions): against its reference, and new block masks per call
# without a recompilation
timeout -k 5 60 python3 -m pytest -m gpu -q -p no:cacheprovider -k "biformer and flex" tests/test_sparse_gpu.py \
  > "$OUT/gpu-tests-biformer-flex.txt" 2>&1
tail -n 15 "$OUT/gpu-tests-biformer-flex.txt"

sweep() {  # sweep WALL_S RUN ARGS...
  local wall=$1 run=$2; shift 2
  timeout -k 10 "$wall" python3 -m attnbench.cli sweep=sparse_impl_routed device=cuda results_dir="$OUT" run_id="$run" "$@" \
    > "$OUT/$run.txt" 2>&1
  echo "== $run: exit $? after ${SECONDS}s"
  python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/$run').finalize()" 2>/dev/null
}

# 1. the preset's options: combiner impl=sdpa, routing, biformer; then the cuDNN baseline in the same run
sweep 80 h200-routed-sdpa "methods=[combiner_fixed,combiner_axial,routing,biformer]"
sweep 25 h200-routed-sdpa "methods=[sdpa_cudnn]"
# 2. the FlexAttention forms of combiner (a compile per case)
sweep 60 h200-routed-flex "methods=[combiner_fixed,combiner_axial]" \
  method_options.combiner_fixed.impl=flex method_options.combiner_axial.impl=flex

# 3. biformer impl=flex (the same routing, a BlockMask from the routed region indices, one compiled
#    FlexAttention call): compare with biformer in h200-routed-sdpa (impl=gather)
sweep ${BIFLEX_S:-40} h200-routed-biformer-flex "methods=[biformer]" method_options.biformer.impl=flex

for r in sdpa flex biformer-flex; do grep -h "not ok\|cases:" "$OUT/h200-routed-$r.txt" | grep -v "case/s" | tail -n 6; done
