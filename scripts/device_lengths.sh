#!/usr/bin/env bash
# One call on the 2-GPU kind: the mask sweep at 8K and 32K too (4K ... 64K in powers of two), by resuming
# each half with seq_lens=[8192,32768]: GPU 0 half A, GPU 1 half B. Everything comes back as $OUT/runs.tgz.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
eval "$(grep '^MASKS_' scripts/device_final.sh)"
R=results
M="dense_mask_budget_mb=4096 seq_lens=[8192,32768]"
( CUDA_VISIBLE_DEVICES=0 timeout 540 scripts/device_run.sh sweep=masks $M device=cuda:0 results_dir=$R run_id=h200-masks-a "masks=$MASKS_A" > $OUT/a.txt 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 540 scripts/device_run.sh sweep=masks $M device=cuda:0 results_dir=$R run_id=h200-masks-b "masks=$MASKS_B" > $OUT/b.txt 2>&1 ) &
wait
PYTHONPATH=$PWD python3 -c "from bench.store import RowStore; [RowStore('$R/'+r).finalize() for r in ('h200-masks-a', 'h200-masks-b')]"
tar czf $OUT/runs.tgz $R/h200-masks-a $R/h200-masks-b
grep -v "case/s" $OUT/a.txt | grep "cases:\|not ok" ; grep -v "case/s" $OUT/b.txt | grep "cases:\|not ok"; tail -c 600 $OUT/a.txt; tail -c 600 $OUT/b.txt
