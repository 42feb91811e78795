#!/usr/bin/env bash
# Issue 9's last cells (planned in the fourteenth session; carry .whl, .triton-cache; `make device-wheel` first):
#   1. superlinear causal 128K / 512K fwd into h200-superlinear-v2 (the scale rows with the current code:
#      its 512K row in h200-sparse is the PyTorch search's `timeout`); ~4 s a 512K call, ~7 calls a case;
#   2. long_short (strided) causal 1M fwd and fwd_bwd into h200-impl-strided, its `timeout` rows retried (20-45 s
#      budgets then; at its 512K rate a 1M call is ~3 s fwd, ~12 s fwd_bwd);
#   3. superlinear causal 1M fwd_bwd into h200-superlinear-v2 (62.8 s a call in the thirteenth session, whose files
#      were lost; a case makes ~5 calls: budget 370 s).
# Planned calls (the fourteenth session's note):
#   L2=0 WRAP_S=560 bash scripts/device_wrap.sh s15-a scripts/device_s15_sparse.sh scripts/device_s15_linear.sh
#       (steps 1-2 here, then lamamba's streamed 512K / 1M: ~530 s)
#   P1=0 P2=0 P4=240 L1=0 WRAP_S=560 bash scripts/device_wrap.sh s15-b scripts/device_s15_sparse.sh scripts/device_s15_linear.sh
#       (superlinear's sorted query order: GPU tests and 16K-1M; the fused WY kernel with tf32 dots: ~510 s;
#       L3=120 adds the chunk-32 Triton backward where time allows)
#   P1=0 P2=0 P3=400 L1=0 L2=0 WRAP_S=440 ... (superlinear's 1M fwd_bwd alone, ~400 s; optional: issue 9 asks 256K)
#   P5=150 (with P1=0 P2=0 L1=0 L2=0, or beside a short call): probsparse's measurement kernel (step 5)
# A wall of 0 skips the step; each case's budget is its step's wall less 30 s (the worker's start).
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
for run in h200-superlinear-v2 h200-impl-strided; do [ -d "$OUT/$run" ] || cp -r results/$run "$OUT/"; done
T1M="timing.budget_ms=400 timing.min_reps=1"
inv() {  # inv SWEEP WALL_S LOG RUN ARGS...
  local sweep=$1 wall=$2; shift 2; [ "$wall" = 0 ] && return 0
  sweep_step $sweep "$wall" "$@" case_timeout_s=$((wall - 30)) $T1M
}
inv sparse ${P1:-150} superlinear-scale h200-superlinear-v2 "methods=[superlinear]" "masks=[causal]" \
  "seq_lens=[131072,524288]" "modes=[fwd]"
# two cases in one step: each gets the step's budget less the other's likely share
inv sparse_impl ${P2:-210} long-short-causal-1m h200-impl-strided "methods=[long_short]" "masks=[causal]" \
  "seq_lens=[1048576]" "retry=[timeout]"
inv sparse ${P3:-0} superlinear-1m-bwd h200-superlinear-v2 "methods=[superlinear]" "masks=[causal]" \
  "seq_lens=[1048576]" "modes=[fwd_bwd]"
tests_then_run() {  # tests_then_run WALL_S TESTS_S KEYWORD LOG RUN ARGS...: the GPU tests -k KEYWORD, then the run
  local wall=$1 tests=$2 key=$3 log=$4 run=$5; shift 5
  timeout -k 5 "$tests" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_gpu.py -k "$key" \
    > "$OUT/gpu-tests-$log.txt" 2>&1
  echo "== gpu tests ($key) after ${SECONDS}s"; tail -n 5 "$OUT/gpu-tests-$log.txt"
  inv sparse "$wall" "$log" "$run" "$@"
  python3 scripts/sparse_summary.py "$OUT/$run" > "$OUT/$log-summary.md" 2>&1
}
# 4. query_order: sorted (each span's query rows grouped by the span's start: ~2-3x the attended pairs in the
#    BlockMasks' tiles instead of ~70-100x, results/cpu-superlinear-tiles): its GPU tests, then a new run
#    h200-superlinear-sorted, causal 16K / 64K / 256K / 1M, fwd and fwd_bwd (against h200-superlinear-v2)
[ "${P4:-0}" = 0 ] || tests_then_run "$P4" "${G4:-150}" superlinear superlinear-sorted h200-superlinear-sorted \
  "methods=[superlinear]" "masks=[causal]" "seq_lens=[16384,65536,262144,1048576]" \
  +method_options.superlinear.query_order=sorted
# 5. probsparse with measure: triton (its sparsity measurement by one kernel instead of gathering the sampled keys in
#    fp32: 99 % of its 1M full fwd in h200-sparse): GPU tests, then a new run h200-probsparse-triton, full 16K / 64K /
#    256K / 1M, fwd and fwd_bwd (against h200-sparse's probsparse rows)
[ "${P5:-0}" = 0 ] || tests_then_run "$P5" "${G5:-90}" probsparse probsparse-triton h200-probsparse-triton \
  "methods=[probsparse]" "masks=[full]" "seq_lens=[16384,65536,262144,1048576]" \
  +method_options.probsparse.measure=triton
python3 scripts/sparse_summary.py "$OUT/h200-superlinear-v2" > "$OUT/superlinear-summary.md" 2>&1
for f in "$OUT"/superlinear-*.txt "$OUT"/long-short-*.txt "$OUT"/probsparse-*.txt; do
  [ -f "$f" ] || continue
  echo "== $(basename $f)"; tr '\r' '\n' < "$f" | grep -v "case/s" | grep "cases:\|not ok\|median" -A6 | tail -n 12
done
echo "== done after ${SECONDS}s"
