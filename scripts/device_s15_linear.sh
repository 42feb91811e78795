#!/usr/bin/env bash
# Issue 10's lamamba at 1M (planned in the fourteenth session; carry .whl, .triton-cache): the streamed layer
# (`stream: auto`, pieces of 128K above 256K tokens, checkpointed with gradients; methods/hybrid/lamamba.py) with
# impl triton, causal 512K / 1M fwd and fwd_bwd, into a new run h200-linear-lamamba-stream (h200-linear-lamamba-triton
# had 1M fwd / fwd_bwd and 512K fwd_bwd `oom` whole). Expected peaks: ~25 GB fwd, ~50 GB fwd_bwd at 1M.
#   L1=170 L2=70 (defaults; L3=120 adds the chunk-32 backward) ... chained after scripts/device_s15_sparse.sh
set -u
. scripts/device_env.sh
export TRITON_CACHE_AUTOTUNING=1
[ "${L1:-170}" = 0 ] || sweep_step linear ${L1:-170} lamamba-stream h200-linear-lamamba-stream "methods=[lamamba]" \
  "seq_lens=[524288,1048576]" +method_options.lamamba.impl=triton case_timeout_s=$(( ${L1:-170} / 2 - 10 ))
[ "${L1:-170}" = 0 ] || python3 scripts/linear_summary.py "$OUT/h200-linear-lamamba-stream" > "$OUT/lamamba-stream-summary.md" 2>&1
# 2. the fused WY kernel with one-product tf32 dots (wy_precision: tf32; 120 registers a thread at C = 64 against
#    tf32x3's 231, methods/linear/wy_triton.py DEFAULTS): delta_rule / gated_delta_rule fwd 32K / 128K / 1M and fwd_bwd
#    32K into h200-linear-delta-wytf32; against h200-linear-delta-fused-v2's 7.54 / 29.8 / 243 ms (tf32x3)
FUSED="+method_options.gated_delta_rule.solve=fused +method_options.delta_rule.solve=fused"
TRI="+method_options.gated_delta_rule.impl=triton +method_options.delta_rule.impl=triton"
TF32="+method_options.gated_delta_rule.wy_precision=tf32 +method_options.delta_rule.wy_precision=tf32"
[ "${L2:-70}" = 0 ] || sweep_step linear ${L2:-70} delta-wytf32 h200-linear-delta-wytf32 \
  "methods=[delta_rule,gated_delta_rule]" "seq_lens=[32768,131072,1048576]" "modes=[fwd]" $TRI $FUSED $TF32 case_timeout_s=30
[ "${L2:-70}" = 0 ] || sweep_step linear 40 delta-wytf32-bwd h200-linear-delta-wytf32 \
  "methods=[delta_rule,gated_delta_rule]" "seq_lens=[32768]" "modes=[fwd_bwd]" $TRI $FUSED $TF32 case_timeout_s=25
# 3. the Triton WY backward at chunk 32 (the thirteenth session's plan; its step failed on a Hydra override then)
C32="+method_options.gated_delta_rule.wy_backward=triton +method_options.delta_rule.wy_backward=triton ++method_options.gated_delta_rule.chunk=32 ++method_options.delta_rule.chunk=32"
[ "${L3:-0}" = 0 ] || sweep_step linear ${L3:-0} delta-fused-c32 h200-linear-delta-fused-c32 \
  "methods=[delta_rule,gated_delta_rule]" "seq_lens=[8192,32768,131072,1048576]" $TRI $FUSED $C32 case_timeout_s=40
for run in h200-linear-delta-wytf32 h200-linear-delta-fused-c32; do
  [ -d "$OUT/$run" ] && python3 scripts/linear_summary.py "$OUT/$run" > "$OUT/$run-summary.md" 2>&1
done
for f in "$OUT"/delta-*.txt; do
  [ -f "$f" ] || continue
  echo "== $(basename $f)"; tr '\r' '\n' < "$f" | grep -v "case/s" | grep "cases:\|not ok\|median" -A8 | tail -n 14
done
[ -f "$OUT/lamamba-stream.txt" ] && { echo "== lamamba-stream.txt"; tr '\r' '\n' < "$OUT/lamamba-stream.txt" | grep -v "case/s" | grep "cases:\|not ok\|median" -A8 | tail -n 14; }
echo "== done after ${SECONDS}s"
