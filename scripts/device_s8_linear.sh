#!/usr/bin/env bash
# Issue 10 on one H200, what the seventh session built on the CPU and could not time (all NEW runs: method
# options are not part of a case key, and changed code must not resume rows measured before it):
#   1. the kernelised methods (performer, cosformer, rfa with its floor, features 64 = width 128) through the own Triton scan (method_options.<m>.impl=triton: PyTorch feature maps,
#      then linear_attn_triton's kernels with identity features), performer (m = 128) and cosformer (2d = 256
#      features), causal 8K / 32K / 128K / 1M, fwd and fwd_bwd (their PyTorch chunked forms `oom` at 1M in
#      results/h200-linear); cosformer's 256-wide tiles also at num_warps=8 (a run of its own);
#   2. the delta rules and simple_gla's PyTorch form with the chunk loop's own backward (the old one was quadratic in
#      length: 131K fwd_bwd 6.5 s against 0.2 s fwd on the CPU; 256K `timeout` on the H200) and `segment: auto`
#      (64K-token segments above 128K keys, checkpointed in training), 8K ... 1M;
#   3. linear_attn_triton at num_warps=8 (the sixth session's step had a Hydra '+' too many and wrote no rows).
#   WRAP_S=560 bash scripts/device_wrap.sh s8-linear scripts/device_s8_linear.sh      (carry .whl, .triton-cache)
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
L="seq_lens=[8192,32768,131072,1048576]"
KT=h200-linear-kernelized-triton
inv ${A1:-190} kernelized $KT "methods=[performer,cosformer,rfa]" "$L" +method_options.performer.impl=triton \
  +method_options.cosformer.impl=triton +method_options.rfa.impl=triton method_options.performer.chunk=64 \
  method_options.cosformer.chunk=64 method_options.rfa.chunk=64 case_timeout_s=45
inv ${A2:-60} kernelized-w8 $KT-w8 "methods=[cosformer]" "seq_lens=[32768,131072]" +method_options.cosformer.impl=triton \
  method_options.cosformer.chunk=64 +method_options.cosformer.num_warps=8 case_timeout_s=40
# rfa with fp32 features in the scan (feature_dtype=float32: bf16 features miss the gate near its floor on the CPU)
inv ${A5:-60} rfa32 $KT-rfa-fp32features "methods=[rfa]" "seq_lens=[32768,131072,1048576]" +method_options.rfa.impl=triton \
  method_options.rfa.chunk=64 +method_options.rfa.feature_dtype=float32 case_timeout_s=40
DV=h200-linear-delta-v2
inv ${A3:-170} delta $DV "methods=[gated_delta_rule,delta_rule,simple_gla]" \
  "seq_lens=[8192,32768,131072,262144,1048576]" case_timeout_s=60
inv ${A4:-60} w8 h200-linear-triton-v3-w8 "methods=[linear_attn_triton]" "seq_lens=[32768,131072,1048576]" \
  method_options.linear_attn_triton.num_warps=8 case_timeout_s=40
for run in $KT $DV; do python3 scripts/linear_summary.py "$OUT/$run" > "$OUT/$run-summary.md" 2>&1; done
for f in "$OUT"/kernelized*.txt "$OUT"/rfa32.txt "$OUT"/delta.txt "$OUT"/w8.txt; do echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok" -A4 | tail -n 8; done
echo "== done after ${SECONDS}s"
