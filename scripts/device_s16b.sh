#!/usr/bin/env bash
# The sixteenth session's last call (carry .whl, .triton-cache), inside the wrap so that one archive comes back:
#   TOTAL_S=390 WRAP_S=410 bash scripts/device_wrap.sh s16b scripts/device_s16b.sh   (as run: ~380 s)
# 1. fla_gated_delta_rule, the fourth fla-core backend of issue 10, which no kernel run had measured: causal 32K /
#    128K / 1M fwd and fwd_bwd, resumed into h200-linear-fla-long (fwd_bwd: `unsupported` at build on Triton 3.6 on
#    Hopper, fla's own refusal; fwd: the ratio of the own gated_delta_rule to fla);
# 2. issue 11's task grid, calls 0 1 2 of results/task-grid-plan.json, until TOTAL_S seconds of this script have
#    passed (scripts/device_task_grid.sh with its own scratch folder; its runs.tgz and logs come back inside this
#    call's archive: unpack runs.tgz from there, as for a task-grid call).
set -u
. scripts/device_env.sh
export TRITON_CACHE_AUTOTUNING=1
[ -d "$OUT/h200-linear-fla-long" ] || cp -r results/h200-linear-fla-long "$OUT/"
[ "${F1:-130}" = 0 ] || sweep_step linear ${F1:-130} fla-gated h200-linear-fla-long \
  "methods=[fla_gated_delta_rule]" "seq_lens=[32768,131072,1048576]" case_timeout_s=90 \
  timing.budget_ms=400 timing.min_reps=1
WALL=$(( ${TOTAL_S:-490} - SECONDS )) SCRATCH=/tmp/task-grid-out bash scripts/device_task_grid.sh 0 1 2
echo "== done after ${SECONDS}s"
