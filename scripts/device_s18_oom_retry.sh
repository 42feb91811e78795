#!/usr/bin/env bash
# Issue 11's task grid: the `oom` rows of h200-task-grid were trained beside 11 other cases on the one GPU (their
# reasons list the other processes' memory: three other processes held ~35 GiB each). Re-run some alone to see
# whether the case itself runs out of memory: eager on digits 1K seed 2, then tensor_attn on chunk_reverse and
# delayed_copy at 512 tokens seed 2 (two at once; its other seeds there are `timeout` at the suite's 180 s cap,
# so `timeout` is the expected answer). retry=[oom]: only those rows are re-run; the run folder comes back packed.
#   WRAP_S=400 bash scripts/device_wrap.sh oom-retry scripts/device_s18_oom_retry.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
R=$OUT/results
mkdir -p "$R" && cp -r results/h200-task-grid "$R/"
train() {
  local log=$1; shift
  timeout -s TERM -k 20 "${STEP_S:-300}" python3 -m attnbench.cli train suite=tasks_grid run_id=h200-task-grid \
    results_dir="$R" 'retry=[oom]' "$@" > "$OUT/$log.txt" 2>&1
  echo "== $log: exit $? after ${SECONDS}s"; tail -n 4 "$OUT/$log.txt"
}
train eager-digits 'tasks=[digits]' 'methods=[eager]' 'seeds=[2]' parallel=1
train tensor-attn 'tasks=[chunk_reverse,delayed_copy]' 'methods=[tensor_attn]' 'seeds=[2]' parallel=2
echo "== done after ${SECONDS}s"
