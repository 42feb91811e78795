#!/usr/bin/env bash
# One call on the 1-GPU kind (~5 minutes of GPU time): task quality.
#   1. a 20-step smoke of every method in $METHODS on MQAR (and the cross tasks: do they run at all);
#   2. the MQAR reproduction (suite=mqar: 256 tokens, 64 pairs, 2 layers, d_model 128) with $MQAR_METHODS;
#   3. every task x $METHODS x 2 lengths (suite=tasks_gpu), seed 0 first, then seeds 1 and 2 while time lasts
#      (the same run_id resumes; what did not fit is missing from quality.jsonl, never filled in).
# METHODS: the attention methods of the task grid (default the exact fused kernel); add linear/sparse methods as
# they land, e.g. METHODS="sdpa_cudnn flex my_linear". Everything comes back as $OUT/runs.tgz.
set -u
METHODS=${METHODS:-sdpa_cudnn}
MQAR_METHODS=${MQAR_METHODS:-sdpa_cudnn flex}
list() { echo "[$(echo $1 | tr ' ' ',')]"; }
if ! python3 -c "import hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > $OUT/install.txt 2>&1 \
  || export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# Triton autotuning results are cached on disk (triton >= 3.2 knob): a Triton method (fla-core's kernels autotune
# per process: 60-94 s first calls on the H200, h200-linear/device-logs) tunes once per machine, not once per worker.
export TRITON_CACHE_AUTOTUNING=1
R=$OUT/results
T="python3 -m attnbench.cli train"
python3 -c "import attnbench.tasks, sklearn" 2>&1 | tail -n 1 > $OUT/imports.txt
timeout 60 $T suite=tasks_gpu "methods=$(list "$METHODS $MQAR_METHODS")" tasks=[mqar,sort,delayed_copy] seeds=[0] \
  steps=20 seq_lens=[256] results_dir=$R run_id=h200-tasks-smoke > $OUT/smoke.txt 2>&1
timeout 150 $T suite=mqar "methods=$(list "$MQAR_METHODS")" results_dir=$R run_id=h200-mqar > $OUT/mqar.txt 2>&1
timeout $((290 - SECONDS)) $T suite=tasks_gpu "methods=$(list "$METHODS")" seeds=[0] results_dir=$R \
  run_id=h200-tasks > $OUT/tasks0.txt 2>&1
[ $SECONDS -lt 270 ] && timeout $((295 - SECONDS)) $T suite=tasks_gpu "methods=$(list "$METHODS")" seeds=[0,1,2] \
  results_dir=$R run_id=h200-tasks > $OUT/tasks.txt 2>&1
for run in h200-tasks-smoke h200-mqar h200-tasks; do
  [ -d $R/$run ] && python3 -c "from attnbench.record.quality import QualityStore; QualityStore('$R/$run').finalize()" \
    && python3 -m attnbench.cli report $R/$run > /dev/null 2>&1
done
tar czf $OUT/runs.tgz -C $OUT results
cat $OUT/imports.txt; tail -n 12 $OUT/smoke.txt; tail -n 4 $OUT/mqar.txt; tail -n 70 $OUT/tasks*.txt
