#!/usr/bin/env bash
# Issue 10 on one H200, ninth session (NEW runs only: method options are not part of a case key, and changed
# code must not resume rows measured before it):
#   1. the delta rules and simple_gla with impl: triton: the inter-chunk state loop (forward and its backward)
#      through the own kernels of methods/linear/delta_triton.py instead of the Python loop over chunks
#      (launch-bound: 8K tokens 22 ms fwd / 69 ms fwd_bwd in h200-linear-delta-v2); everything else (the WY
#      pieces, the outputs, `segment: auto` above 128K keys) as in that run; dot_precision ieee (the default);
#      optional, each a run of its own at 8K / 128K / 1M: TF32=1: dot_precision tf32 (tensor cores);
#      BV16=1: block_v 16 (grid B·H·dv/16 = 128 programs at 16 heads, d 128, against 32 at the default 64:
#      about the H200's 132 SMs, a quarter of the sequential work per program).
#   WRAP_S=560 bash scripts/device_wrap.sh s9-linear scripts/device_s9_linear.sh      (carry .whl, .triton-cache)
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
AB="python3 -m attnbench.cli"
fin() { python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/$1').finalize()" 2>/dev/null; }
inv() {  # inv WALL_S LOG RUN ARGS...
  local wall=$1 log=$2 run=$3; shift 3
  timeout -k 10 "$wall" $AB sweep=linear device=cuda results_dir="$OUT" run_id=$run "$@" > "$OUT/$log.txt" 2>&1
  echo "== $log: exit $? after ${SECONDS}s"; fin $run
}
DM="methods=[gated_delta_rule,delta_rule,simple_gla]"
DL="seq_lens=[8192,32768,131072,262144,524288,1048576]"
TRI="+method_options.gated_delta_rule.impl=triton +method_options.delta_rule.impl=triton +method_options.simple_gla.impl=triton"
DT=h200-linear-delta-triton
inv ${A1:-240} delta-triton $DT "$DM" "$DL" $TRI case_timeout_s=90
RUNS="$DT"
if [ "${TF32:-0}" = 1 ]; then
  inv ${A2:-120} delta-triton-tf32 $DT-tf32 "$DM" "seq_lens=[8192,131072,1048576]" $TRI \
    +method_options.gated_delta_rule.dot_precision=tf32 +method_options.delta_rule.dot_precision=tf32 \
    +method_options.simple_gla.dot_precision=tf32 case_timeout_s=90
  RUNS="$RUNS $DT-tf32"
fi
if [ "${BV16:-0}" = 1 ]; then
  inv ${A3:-120} delta-triton-bv16 $DT-bv16 "$DM" "seq_lens=[8192,131072,1048576]" $TRI \
    +method_options.gated_delta_rule.block_v=16 +method_options.delta_rule.block_v=16 \
    +method_options.simple_gla.block_v=16 case_timeout_s=90
  RUNS="$RUNS $DT-bv16"
fi
for run in $RUNS; do python3 scripts/linear_summary.py "$OUT/$run" > "$OUT/$run-summary.md" 2>&1; done
for f in "$OUT"/delta-triton*.txt; do echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok" -A4 | tail -n 8; done
echo "== done after ${SECONDS}s"
