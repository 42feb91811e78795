#!/usr/bin/env bash
# Issue 9's dense-baseline cells at 1M that the grid of results/h200-sparse still lacks (its sparse-summary.md,
# "Grid cells without a row"): sdpa_cudnn full fwd / fwd_bwd, causal fwd_bwd; flex full fwd / fwd_bwd. Carry .whl
# (`make device-wheel` first). They resume the committed run folder (a copy under $OUT), so cases with rows are
# skipped. One 1M call costs (4 * L^2 * d * H flops, batch 1, 16 heads, head dim 128, bf16): cuDNN full fwd ~15 s,
# causal fwd_bwd ~30 s, full fwd_bwd ~60 s; flex full fwd ~20 s, full fwd_bwd ~100 s+. A case makes ~4 full calls
# (first call with the gate's output, memory, the timer's estimate, one repetition: timing.min_reps=1), so each
# step's wall leaves ~30 s over the case budget for the worker's start. A wall of 0 skips the step.
#   D1=150 bash scripts/device_wrap.sh s14-dense-a scripts/device_s14_dense.sh          # cuDNN full fwd
#   D2=200 D3=300 D4=... bash scripts/device_wrap.sh s14-dense-b scripts/device_s14_dense.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
RUN=h200-sparse
[ -d "$OUT/$RUN" ] || cp -r results/$RUN "$OUT/"
T1M="timing.budget_ms=400 timing.min_reps=1"
inv() {  # inv WALL_S CASE_S LOG ARGS...: the case budget is the step's wall less 30 s
  local wall=$1 log=$2; shift 2; [ "$wall" = 0 ] && return 0
  sweep_step sparse "$wall" "$log" $RUN "seq_lens=[1048576]" case_timeout_s=$((wall - 30)) $T1M "$@"
}
inv ${D1:-0} dense-cudnn-full-fwd "methods=[sdpa_cudnn]" "masks=[full]" "modes=[fwd]"
inv ${D2:-0} dense-cudnn-causal-fwd-bwd "methods=[sdpa_cudnn]" "masks=[causal]" "modes=[fwd_bwd]"
inv ${D3:-0} dense-cudnn-full-fwd-bwd "methods=[sdpa_cudnn]" "masks=[full]" "modes=[fwd_bwd]"
inv ${D4:-0} dense-flex-full-fwd "methods=[flex]" "masks=[full]" "modes=[fwd]"
inv ${D5:-0} dense-flex-full-fwd-bwd "methods=[flex]" "masks=[full]" "modes=[fwd_bwd]"
for f in "$OUT"/dense-*.txt; do
  [ -f "$f" ] || continue
  echo "== $(basename $f)"; tr '\r' '\n' < "$f" | grep -v "case/s" | grep "cases:\|not ok\|median" -A6 | tail -n 12
done
python3 - "$OUT/$RUN" <<'EOF'
import sys, pandas as pd
rows = pd.read_json(sys.argv[1] + "/rows.jsonl", lines=True)
sel = rows[(rows.seq_q == 1048576) & rows.method.isin(["sdpa_cudnn", "flex"])]
print(sel[["method", "mask", "mode", "status", "ms_median", "tflops", "peak_mem_mb", "reason"]].to_string())
EOF
echo "== done after ${SECONDS}s"
