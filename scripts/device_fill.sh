#!/usr/bin/env bash
# A short call that resumes the two mask-sweep halves (smallest cases first) and returns their logs.
set -u
eval "$(grep '^MASKS_' scripts/device_final.sh)"
R=results
timeout "${1:-50}" scripts/device_run.sh sweep=masks dense_mask_budget_mb=4096 results_dir=$R run_id=h200-masks-a "masks=$MASKS_A" > $OUT/a.txt 2>&1
timeout "${2:-60}" scripts/device_run.sh sweep=masks dense_mask_budget_mb=4096 results_dir=$R run_id=h200-masks-b "masks=$MASKS_B" > $OUT/b.txt 2>&1
tar czf $OUT/runs.tgz $R/h200-masks-a $R/h200-masks-b
tail -n 3 $OUT/a.txt $OUT/b.txt
