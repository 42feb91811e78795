#!/usr/bin/env bash
# Issue 11's report joins task quality to the same method's kernel time: kernel rows of every method at the task
# grid's attention shape (conf/sweep/tasks_kernels.yaml: fwd_bwd, causal and full, b32 h2 d32, 128 and 512
# tokens; 176 runnable cases where fla imports, ~4 min), one run (h200-tasks-kernels, resumable). Carry .whl and
# .triton-cache (fla's autotuning at head dim 32 is the task grid's: cached after its calls). Then on the
# workstation: attnbench report results/h200-task-grid results/h200-tasks-kernels --out results/h200-task-grid-report
#   WRAP_S=560 bash scripts/device_wrap.sh tasks-kernels scripts/device_tasks_kernels.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH, sweep_step
export TRITON_CACHE_AUTOTUNING=1
RUN=h200-tasks-kernels
[ -d results/$RUN ] && cp -r results/$RUN "$OUT/"
sweep_step tasks_kernels ${TK_WALL:-500} tasks-kernels $RUN
grep -v "case/s" "$OUT/tasks-kernels.txt" | grep "cases:" -A2 | tail -n 3
echo "== done after ${SECONDS}s"
