#!/usr/bin/env bash
# The sixteenth session's measuring call (carry .whl, .triton-cache; `make device-wheel` first): the paths that
# became `auto` defaults in the fifteenth session, measured as a user gets them, and the lengths their lines lack.
#   WRAP_S=590 bash scripts/device_wrap.sh s16 scripts/device_s16.sh        (~560 s with the default walls)
# 1. delta_rule / gated_delta_rule with no option at all (impl, solve, wy_precision: auto -> the Triton loop, the
#    fused WY kernel, tf32 dots on bf16), causal 8K / 32K / 128K / 1M fwd and fwd_bwd, beside fla_delta_rule at
#    32K / 128K, into a new run h200-linear-delta-auto: each row's resolved_options must read
#    {"impl": "triton", "solve": "fused", "wy_precision": "tf32"} (the fused fwd_bwd at 128K / 1M with tf32 dots has
#    no row yet; fla's ratio measured in the same call);
# 2. superlinear's sorted order at the lengths h200-superlinear-sorted lacks (causal 4K fwd / fwd_bwd, 128K / 512K
#    fwd, 512K fwd_bwd), resumed there with the same explicit option (a resume with other options is refused);
# 3. probsparse's Triton measurement at full 4K fwd / fwd_bwd, resumed in h200-probsparse-triton;
# 4. (S4, a call of its own: S1=0 S1B=0 S2=0 S3=0 S4=520 WRAP_S=550 ...) fla-core's backends at 256K / 512K / 1M,
#    fwd and fwd_bwd, into a new run h200-linear-fla-long, 150 s a case (fla_delta_rule's 512K timed out twice in its
#    first call at 40 and 85 s budgets; fla_linear_attn and fla_simple_gla were never planned above 128K): issue 10's
#    1M cells of its production baseline, a row each (ok, or the status that says why not).
# A wall of 0 skips the step; each case's budget is its step's wall less 30 s (the worker's start).
set -u
. scripts/device_env.sh
export TRITON_CACHE_AUTOTUNING=1
# 0. the GPU tests of the new defaults first (their rows' resolved_options; the PyTorch paths asked for explicitly)
[ "${G0:-100}" = 0 ] || { timeout -k 5 "${G0:-100}" python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_linear_gpu.py tests/test_sparse_gpu.py -k "delta_rule_defaults or own_methods_pass or superlinear_sorted" \
  > "$OUT/gpu-tests-delta-auto.txt" 2>&1; echo "== gpu tests after ${SECONDS}s"; tail -n 5 "$OUT/gpu-tests-delta-auto.txt"; }
for run in h200-superlinear-sorted h200-probsparse-triton; do [ -d "$OUT/$run" ] || cp -r results/$run "$OUT/"; done
[ "${S1:-200}" = 0 ] || sweep_step linear ${S1:-200} delta-auto h200-linear-delta-auto \
  "methods=[delta_rule,gated_delta_rule]" "seq_lens=[8192,32768,131072,1048576]" case_timeout_s=60
[ "${S1B:-90}" = 0 ] || sweep_step linear ${S1B:-90} delta-auto-fla h200-linear-delta-auto \
  "methods=[fla_delta_rule]" "seq_lens=[32768,131072]" case_timeout_s=60
[ "${S2:-110}" = 0 ] || sweep_step sparse ${S2:-110} superlinear-sorted-fill h200-superlinear-sorted \
  "methods=[superlinear]" "masks=[causal]" "seq_lens=[4096,131072,524288]" +method_options.superlinear.query_order=sorted \
  case_timeout_s=$(( ${S2:-110} - 30 )) timing.budget_ms=400 timing.min_reps=1
[ "${S3:-60}" = 0 ] || sweep_step sparse ${S3:-60} probsparse-triton-4k h200-probsparse-triton \
  "methods=[probsparse]" "masks=[full]" "seq_lens=[4096]" +method_options.probsparse.measure=triton case_timeout_s=30
[ "${S4:-0}" = 0 ] || sweep_step linear ${S4:-0} fla-long h200-linear-fla-long \
  "methods=[fla_delta_rule,fla_linear_attn,fla_simple_gla]" "seq_lens=[262144,524288,1048576]" case_timeout_s=150 \
  timing.budget_ms=400 timing.min_reps=1
[ -d "$OUT/h200-linear-delta-auto" ] && python3 scripts/linear_summary.py "$OUT/h200-linear-delta-auto" \
  > "$OUT/delta-auto-summary.md" 2>&1
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
rows = Path(sys.argv[1], "h200-linear-delta-auto", "rows.jsonl")
for line in rows.read_text().splitlines() if rows.is_file() else []:
    row = json.loads(line)
    print("==", row["method"], row["mode"], row["seq_q"], row["status"], row.get("ms_median"), row.get("resolved_options"))
PY
for f in "$OUT"/delta-auto*.txt "$OUT"/superlinear-sorted-fill.txt "$OUT"/probsparse-triton-4k.txt "$OUT"/fla-long.txt; do
  [ -f "$f" ] || continue
  echo "== $(basename $f)"; tr '\r' '\n' < "$f" | grep -v "case/s" | grep "cases:\|not ok\|median" -A8 | tail -n 14
done
echo "== done after ${SECONDS}s"
