#!/usr/bin/env bash
# Issue 9's superlinear cells after the twelfth session's memory work (planned then; carry .whl, .triton-cache;
# `make device-wheel` first), ~560 s. superlinear now searches with Triton by default on CUDA (`search: auto`),
# computes its gates in steps of query rows, runs its span attention in query chunks (`query_chunk: auto`, 8
# chunks of 128K at 1M, checkpointed with gradients) and gates long cases on the sampled rows only: projected 1M
# peak ~27 GiB fwd, ~54 GiB fwd_bwd (was ~141 GiB: the 1M fwd_bwd `oom` of h200-superlinear-search).
#   1. its GPU tests (chunked rows, chunked == whole, the replayed memory model against the allocator at 64K);
#   2. h200-superlinear-v2 (a new run: new code, same options): causal 64K / 256K fwd and fwd_bwd (the memory
#      model's 256K prediction: ~12.2 GB fwd, ~18.8 GB fwd_bwd; h200-superlinear-search had 21.9 / 31.9), then
#      1M fwd (a case makes 6-7 full calls of ~13 s: budget 240 s; the step wall leaves 35 s for the worker's start,
#      which the case budget does not count: h200-superlinear-search lost its 1M fwd row to a 10 s margin);
#   3. 1M fwd_bwd (budget 380 s) in a second call: a step whose wall is 0 is skipped.
#   WRAP_S=560 bash scripts/device_wrap.sh s13-sparse scripts/device_s13_sparse.sh
#   G1=0 S1=0 S2=0 S3=420 WRAP_S=560 bash scripts/device_wrap.sh s13-sparse-b scripts/device_s13_sparse.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
RUN=h200-superlinear-v2
T1M=${T1M:-timing.budget_ms=400 timing.min_reps=1}
inv() {  # inv WALL_S LOG RUN ARGS... (sweep_step: scripts/device_env.sh); a wall of 0 skips the step
  local wall=$1 log=$2; shift 2; [ "$wall" = 0 ] && return 0; sweep_step sparse "$wall" "$log" "$@"
}
[ "${G1:-90}" = 0 ] || timeout -k 5 ${G1:-90} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_gpu.py \
  -k superlinear > "$OUT/gpu-tests-superlinear.txt" 2>&1
[ "${G1:-90}" = 0 ] || { echo "== gpu tests after ${SECONDS}s"; tail -n 5 "$OUT/gpu-tests-superlinear.txt"; }
inv ${S1:-100} v2-short $RUN "methods=[superlinear]" "masks=[causal]" "seq_lens=[65536,262144]" \
  "modes=[fwd,fwd_bwd]" case_timeout_s=${CT:-60}
inv ${S2:-275} v2-1m-fwd $RUN "methods=[superlinear]" "masks=[causal]" "seq_lens=[1048576]" "modes=[fwd]" \
  case_timeout_s=${CT2:-240} $T1M
inv ${S3:-0} v2-1m-bwd $RUN "methods=[superlinear]" "masks=[causal]" "seq_lens=[1048576]" "modes=[fwd_bwd]" \
  case_timeout_s=${CT3:-380} $T1M
python3 scripts/sparse_summary.py "$OUT/$RUN" > "$OUT/sparse-summary.md" 2>&1
for f in "$OUT"/v2-*.txt; do
  [ -f "$f" ] || continue
  echo "== $(basename $f)"; tr '\r' '\n' < "$f" | grep -v "case/s" | grep "cases:\|not ok\|median" -A6 | tail -n 12
done
echo "== done after ${SECONDS}s"
