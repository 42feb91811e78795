#!/usr/bin/env bash
# Issue 10 on one H200, ninth session (NEW runs only: method options are not part of a case key, and changed
# code must not resume rows measured before it):
#   1. the delta rules and simple_gla with impl: triton: the inter-chunk state loop (forward and its backward)
#      through the own kernels of methods/linear/delta_triton.py instead of the Python loop over chunks
#      (launch-bound: 8K tokens 22 ms fwd / 69 ms fwd_bwd in h200-linear-delta-v2); everything else (the WY
#      pieces, the outputs, `segment: auto` above 128K keys) as in that run; the kernels' defaults (tf32 dots,
#      block_v 32, 2 stages, 4 warps: chosen offline for sm_90, delta_triton.DEFAULTS; does tf32 pass the gate?);
#      then, each a run of its own at 8K / 128K (IEEE=0 or BV16=0 to skip): IEEE: dot_precision ieee at block_v
#      16, 8 warps, 1 stage (the full-fp32 dots' configuration that spills least offline: 0.5 / 0.7 KB);
#      BV16: tf32 at block_v 16 (grid B·H·dv/16 = 128 programs at 16 heads, d 128, against 64 at block_v 32).
#   WRAP_S=560 bash scripts/device_wrap.sh s9-linear scripts/device_s9_linear.sh      (carry .whl, .triton-cache)
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
inv() { sweep_step linear "$@"; }  # inv WALL_S LOG RUN ARGS... (scripts/device_env.sh)
# first the GPU tests of the Triton state loop (2K tokens, bf16, both precisions; ~30 s), in the call's log
timeout -k 5 ${GT:-80} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_linear_gpu.py -k triton_state_loop \
  > "$OUT/gpu-tests-delta-triton.txt" 2>&1; echo "== gpu tests: exit $? after ${SECONDS}s"; tail -n 3 "$OUT/gpu-tests-delta-triton.txt"
DM="methods=[gated_delta_rule,delta_rule,simple_gla]"
DL="seq_lens=[8192,32768,131072,262144,524288,1048576]"
TRI="+method_options.gated_delta_rule.impl=triton +method_options.delta_rule.impl=triton +method_options.simple_gla.impl=triton"
DT=h200-linear-delta-triton
inv ${A1:-180} delta-triton $DT "$DM" "$DL" $TRI case_timeout_s=90
RUNS="$DT"
if [ "${IEEE:-1}" = 1 ]; then
  opts=""
  for m in gated_delta_rule delta_rule simple_gla; do
    opts="$opts +method_options.$m.dot_precision=ieee +method_options.$m.block_v=16 +method_options.$m.num_warps=8"
    opts="$opts +method_options.$m.num_stages=1"
  done
  inv ${A2:-50} delta-triton-ieee $DT-ieee "$DM" "seq_lens=[8192,131072]" $TRI $opts case_timeout_s=40
  RUNS="$RUNS $DT-ieee"
fi
if [ "${BV16:-1}" = 1 ]; then
  inv ${A3:-50} delta-triton-bv16 $DT-bv16 "$DM" "seq_lens=[8192,131072]" $TRI \
    +method_options.gated_delta_rule.block_v=16 +method_options.delta_rule.block_v=16 \
    +method_options.simple_gla.block_v=16 case_timeout_s=40
  RUNS="$RUNS $DT-bv16"
fi
for run in $RUNS; do python3 scripts/linear_summary.py "$OUT/$run" > "$OUT/$run-summary.md" 2>&1; done
for f in "$OUT"/delta-triton*.txt; do echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok" -A4 | tail -n 8; done
echo "== done after ${SECONDS}s"
