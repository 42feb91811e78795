#!/usr/bin/env bash
# For the next session with device time (2-GPU kind): finish the committed runs in one call.
# GPU 1 resumes mask half B; GPU 0 re-runs the 11 stale flex-bwd error rows of the core sweep, then resumes
# mask half A. Smallest cases run first. Everything comes back as one archive; untar it over results/ and run
# `attnbench report` (see results/README.md); the tables are finalized on the device.
set -u
eval "$(grep '^MASKS_' scripts/device_final.sh)"
R=results
( timeout 540 scripts/device_run.sh sweep=masks dense_mask_budget_mb=4096 device=cuda:1 results_dir=$R run_id=h200-masks-b "masks=$MASKS_B" > $OUT/b.txt 2>&1 ) &
( timeout 150 scripts/device_run.sh sweep=gpu device=cuda:0 results_dir=$R run_id=h200x2-gpu retry=[error] case_timeout_s=240 > $OUT/gpu.txt 2>&1
  timeout $((545 - SECONDS)) scripts/device_run.sh sweep=masks dense_mask_budget_mb=4096 device=cuda:0 results_dir=$R run_id=h200-masks-a "masks=$MASKS_A" > $OUT/a.txt 2>&1 ) &
wait
PYTHONPATH=$PWD python3 -c "from bench.store import RowStore; [RowStore('$R/'+r).finalize() for r in ('h200x2-gpu', 'h200-masks-a', 'h200-masks-b')]"
tar czf $OUT/runs.tgz $R/h200x2-gpu $R/h200-masks-a $R/h200-masks-b
tail -n 2 $OUT/gpu.txt $OUT/a.txt $OUT/b.txt
