#!/usr/bin/env bash
# Issue 10's lamamba at 1M (planned in the fourteenth session; carry .whl, .triton-cache): the streamed layer
# (`stream: auto`, pieces of 128K above 256K tokens, checkpointed with gradients; methods/hybrid/lamamba.py) with
# impl triton, causal 512K / 1M fwd and fwd_bwd, into a new run h200-linear-lamamba-stream (h200-linear-lamamba-triton
# had 1M fwd / fwd_bwd and 512K fwd_bwd `oom` whole). Expected peaks: ~25 GB fwd, ~50 GB fwd_bwd at 1M.
#   L1=170 (default) ... chained after scripts/device_s15_sparse.sh (see there)
set -u
. scripts/device_env.sh
export TRITON_CACHE_AUTOTUNING=1
[ "${L1:-170}" = 0 ] || sweep_step linear ${L1:-170} lamamba-stream h200-linear-lamamba-stream "methods=[lamamba]" \
  "seq_lens=[524288,1048576]" +method_options.lamamba.impl=triton case_timeout_s=$(( ${L1:-170} / 2 - 10 ))
[ "${L1:-170}" = 0 ] || python3 scripts/linear_summary.py "$OUT/h200-linear-lamamba-stream" > "$OUT/lamamba-stream-summary.md" 2>&1
[ -f "$OUT/lamamba-stream.txt" ] && { echo "== lamamba-stream.txt"; tr '\r' '\n' < "$OUT/lamamba-stream.txt" | grep -v "case/s" | grep "cases:\|not ok\|median" -A8 | tail -n 14; }
echo "== done after ${SECONDS}s"
