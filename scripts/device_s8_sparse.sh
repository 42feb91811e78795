#!/usr/bin/env bash
# Issue 9's remaining H200 cells (results/h200-sparse), resumed: after the seventh session ~45 cells of the preset
# (256K fwd_bwd, 1M fwd and fwd_bwd; mostly the full mask) had no row and 8 had `timeout` rows from the earlier
# calls' short step caps (20-40 s a case: superlinear 256K in its memory phase, flex causal 256K/1M, combiner_fixed
# causal 1M BlockMask build, routing causal 1M, combiner_axial full 256K). Here every case gets 75 s
# (case_timeout_s; CT to change) and the steps share the call: 256K first (cheaper), then 1M fwd, then 1M fwd_bwd.
# A case that does not fit is a `timeout` row again (the row that says why not); running the script again resumes.
# RETRY (default: none since the eighth session, whose call re-ran the timeouts at 75 s and got 6 rows in 560 s:
# flex causal 1M at ~12 s a forward call timed out again) lists the statuses to re-run, e.g. RETRY=timeout; the
# ninth session runs the 33 cells that have no row yet (7 full 256K fwd_bwd, 26 at 1M: scripts/check_device_plan.py
# results/h200-sparse "" sweep=sparse "seq_lens=[1048576]" lists them); it did not run (device time went to
# issue 10). Next: RETRY=timeout at CT 75 s, since the warm-up no longer repeats a multi-second call (8ef5386):
# flex causal 1M, ~12 s a call, needs about 4 calls now instead of 6. At 1M the timing takes
# budget_ms 400 and min_reps 1 (T1M="..." to change): a call of seconds (flex causal 1M fwd ~12 s) is timed once
# after its warm-up instead of three times, a 40 ms call still ~10 times; rows record reps.
# halo and long_short resume their implementation runs (h200-impl-strided*), as in scripts/device_fill_s3.sh.
#   WRAP_S=560 bash scripts/device_wrap.sh s8-sparse scripts/device_s8_sparse.sh      (carry .whl)
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
CT=${CT:-75}
RETRY=${RETRY:-}
T1M=${T1M:-timing.budget_ms=400 timing.min_reps=1}
inv() {  # inv WALL_S LOG PRESET RUN ARGS... (sweep_step: scripts/device_env.sh)
  local wall=$1 log=$2 preset=$3; shift 3; sweep_step "$preset" "$wall" "$log" "$@"
}
cp -r results/h200-sparse results/h200-impl-strided "$OUT/"
M="methods=[sdpa_cudnn,flex,biformer,biformer_2d,biformer_layer,halo_2d,routing,combiner_fixed,combiner_axial,combiner_logsparse,sparsifiner,probsparse,superlinear]"
inv ${S1:-150} sparse-256k sparse h200-sparse "$M" "retry=[$RETRY]" "seq_lens=[262144]" case_timeout_s=$CT
inv ${S2:-170} sparse-1m-fwd sparse h200-sparse "$M" "retry=[$RETRY]" "seq_lens=[1048576]" "modes=[fwd]" case_timeout_s=$CT $T1M
inv ${S3:-150} sparse-1m-bwd sparse h200-sparse "$M" "retry=[$RETRY]" "seq_lens=[1048576]" "modes=[fwd_bwd]" \
  case_timeout_s=$CT $T1M
inv ${S4:-60} impl-strided-long sparse_impl h200-impl-strided "methods=[long_short]" "seq_lens=[65536,262144,1048576]" \
  "retry=[$RETRY]" case_timeout_s=45
python3 scripts/sparse_summary.py "$OUT/h200-sparse" > "$OUT/sparse-summary.md" 2>&1
for f in "$OUT"/sparse-*.txt "$OUT"/impl-*.txt; do echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok" -A4 | tail -n 6; done
echo "== done after ${SECONDS}s"
