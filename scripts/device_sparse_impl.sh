#!/usr/bin/env bash
# One call on the 1-GPU kind (nvidia-h200): the local methods' implementations (sweep=sparse_impl), one run
# per implementation under $OUT/, each invocation capped (the harness resumes; a cut invocation keeps its
# finished rows). Aimed at ~3.5 minutes of GPU time: install ~20 s, invocations capped 60 + 35 + 30 + 30 + 50 s,
# a GPU test of the strided windows on each SDPA backend (~15 s).
# Before the call: mkdir -p .whl && cp ../shared/device/wheels/*.whl .whl/ && pip wheel --no-deps -w .whl .
# Afterwards: copy $OUT/h200-impl-* into results/; `attnbench report` / compare them.
set -u
OUT=${OUT:-$PWD/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import attnbench" || { echo "attnbench wheel missing from .whl/"; exit 1; }
export PYTHONUNBUFFERED=1
# Triton autotuning results are cached on disk (triton >= 3.2 knob): a Triton method (fla-core's kernels autotune
# per process: 60-94 s first calls on the H200, h200-linear/device-logs) tunes once per machine, not once per worker.
export TRITON_CACHE_AUTOTUNING=1

sweep() {  # sweep WALL_S RUN ARGS...
  local wall=$1 run=$2; shift 2
  timeout -k 10 "$wall" python3 -m attnbench.cli sweep=sparse_impl device=cuda results_dir="$OUT" run_id="$run" "$@" \
    > "$OUT/$run.txt" 2>&1
  echo "== $run: exit $? after ${SECONDS}s"
  python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/$run').finalize()" 2>/dev/null
}

# 1. the defaults (halo strided, long_short strided), then the baselines in the same run (16K, 64K)
sweep 60 h200-impl-strided "methods=[halo,long_short]"
sweep 35 h200-impl-strided "methods=[sdpa_cudnn,flex]" "seq_lens=[16384,65536]"
# 2.-3. halo's other SDPA forms
sweep 30 h200-impl-strided-square "methods=[halo]" method_options.halo.impl=strided_square
sweep 30 h200-impl-gather "methods=[halo]" method_options.halo.impl=gather
# 4. the FlexAttention forms (a compile per case: 16K and 64K only)
sweep 50 h200-impl-flex "methods=[halo,long_short]" "seq_lens=[16384,65536]" \
  method_options.halo.impl=flex method_options.long_short.impl=flex

timeout -k 5 60 python3 -m pytest -m gpu -q -p no:cacheprovider -k "strided or impl" tests/test_sparse_gpu.py \
  > "$OUT/gpu-tests-impl.txt" 2>&1
tail -n 15 "$OUT/gpu-tests-impl.txt"
for r in strided strided-square gather flex; do grep -h "not ok\|cases:" "$OUT/h200-impl-$r.txt" | grep -v "case/s" | tail -n 6; done
