#!/usr/bin/env bash
# Issue 11's report joins task quality to the same method's kernel time: kernel rows of every method at the task
# grid's attention shape (conf/sweep/tasks_kernels.yaml: fwd_bwd, causal and full, b32 h2 d32, 128 and 512
# tokens; 176 runnable cases where fla imports, ~4 min), one run (h200-tasks-kernels, resumable). Carry .whl and
# .triton-cache (fla's autotuning at head dim 32 is the task grid's: cached after its calls). Then on the
# workstation: attnbench report results/h200-task-grid results/h200-tasks-kernels --out results/h200-task-grid-report
#   WRAP_S=560 bash scripts/device_wrap.sh tasks-kernels scripts/device_tasks_kernels.sh
# Second step (same run, a second invocation: config.1.yaml): the full mask at 256 and 1,024 tokens, the lengths of
# the digits task (16 x 16 and 32 x 32 grids): the 2-D methods (biformer_2d, biformer_layer, halo_2d) need a square
# length, so without it the noncausal tasks' join had none of them (128 cases, ~2.5 min). TK_WALL=0 skips the
# first step (already in the committed run), TK2_WALL=0 the second.
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH, sweep_step
export TRITON_CACHE_AUTOTUNING=1
RUN=h200-tasks-kernels
[ -d results/$RUN ] && cp -r results/$RUN "$OUT/"
if [ "${TK_WALL:-500}" != 0 ]; then
  sweep_step tasks_kernels ${TK_WALL:-500} tasks-kernels $RUN
  grep -v "case/s" "$OUT/tasks-kernels.txt" | grep "cases:" -A2 | tail -n 3
fi
if [ "${TK2_WALL:-300}" != 0 ]; then
  sweep_step tasks_kernels ${TK2_WALL:-300} tasks-kernels-square $RUN 'masks=[full]' 'seq_lens=[256,1024]'
  grep -v "case/s" "$OUT/tasks-kernels-square.txt" | grep "cases:" -A2 | tail -n 3
fi
echo "== done after ${SECONDS}s"
