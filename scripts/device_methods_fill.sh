#!/usr/bin/env bash
# One call on one H200: complete the committed runs of issues 9 (results/h200-sparse) and 10 (results/h200-linear)
# by RESUMING them (only cases without a row run; retry=[wrong,error,oom] re-runs the rows whose causes were fixed
# on the CPU since). Each invocation has its own wall-clock cap; long cases get a short case_timeout_s so that a
# case that does not fit becomes a `timeout` row (the row that says why not) instead of eating the call.
#   PART=sparse | linear | all (default all)
# Before: .whl/ holds the attnbench wheel and hydra/omegaconf/antlr4/fla-core/einops wheels (carry .whl).
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
# Triton autotuning results are cached on disk (triton >= 3.2 knob): a Triton method (fla-core's kernels autotune
# per process: 60-94 s first calls on the H200, h200-linear/device-logs) tunes once per machine, not once per worker.
export TRITON_CACHE_AUTOTUNING=1
PART=${PART:-all}
AB="python3 -m attnbench.cli"
fin() { python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/$1').finalize()" 2>/dev/null; }
inv() {  # inv WALL_S LOG PRESET RUN ARGS...
  local wall=$1 log=$2 preset=$3 run=$4; shift 4
  timeout -k 10 "$wall" $AB sweep=$preset device=cuda results_dir="$OUT" run_id=$run "$@" > "$OUT/$log.txt" 2>&1
  echo "== $log: exit $? after ${SECONDS}s"; fin $run
}
if [ "$PART" != linear ]; then
  cp -r results/h200-sparse "$OUT/h200-sparse"
  ONE_D="sdpa_cudnn,flex,biformer,halo,routing,combiner_fixed,combiner_axial,combiner_logsparse,sparsifiner,probsparse,long_short,superlinear"
  SUB="biformer,biformer_2d,halo,halo_2d,routing,combiner_fixed,combiner_axial,combiner_logsparse,long_short,superlinear,probsparse"
  # the fixed failures (4K-256K), the cut 16K/64K grid, and 32K
  inv ${S1:-120} sparse-mid sparse h200-sparse "retry=[wrong,error,oom]" "seq_lens=[4096,16384,32768,65536]" "methods=[$ONE_D]"
  inv ${S2:-60} sparse-long-fwd sparse h200-sparse "retry=[wrong,error,oom]" "seq_lens=[131072,262144,524288]" "modes=[fwd]" \
    "methods=[$SUB]" case_timeout_s=45
  inv ${S3:-60} sparse-256k-bwd sparse h200-sparse "seq_lens=[262144]" "modes=[fwd_bwd]" "methods=[$SUB]" case_timeout_s=45
  inv ${S4:-40} sparse-1m sparse h200-sparse "seq_lens=[1048576]" "modes=[fwd]" "methods=[$SUB]" case_timeout_s=40
  python3 scripts/sparse_summary.py "$OUT/h200-sparse" > "$OUT/sparse-summary.md" 2>&1
fi
if [ "$PART" != sparse ]; then
  cp -r results/h200-linear "$OUT/h200-linear"
  OWN="linear_attn,performer,cosformer,gated_delta_rule"
  MORE="rfa,simple_gla,delta_rule,abc,aaren,lamamba,s4d,nats_l,lla,metamixer"
  inv ${L1:-100} linear-own linear h200-linear "methods=[$OWN]" "seq_lens=[2048,8192,32768,131072,262144]"
  inv ${L2:-60} linear-own-1m linear h200-linear "methods=[$OWN]" "seq_lens=[524288,1048576]" case_timeout_s=45
  inv ${L3:-60} linear-more linear h200-linear "methods=[sdpa_cudnn,$MORE]" "seq_lens=[2048,8192,32768,131072]" case_timeout_s=30
  inv ${L4:-70} linear-fla linear h200-linear "methods=[fla_linear_attn,fla_simple_gla]" "seq_lens=[8192,32768,131072,1048576]" \
    case_timeout_s=60
  python3 scripts/linear_summary.py "$OUT/h200-linear" > "$OUT/linear-summary.md" 2>&1
fi
for f in "$OUT"/sparse-*.txt "$OUT"/linear-*.txt; do [ -f "$f" ] && { echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok" | tail -n 3; }; done
echo "== done after ${SECONDS}s"
