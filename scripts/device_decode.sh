#!/usr/bin/env bash
# One call on the 2-GPU kind:
#   GPU 0: the decode sweep (new run results/h200-decode);
#   GPU 1: add cudnn_split to the mask runs (only the new cases run), then the GPU-only split tests.
# Everything comes back as $OUT/runs.tgz; untar it over the repository and regenerate the reports.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
eval "$(grep '^MASKS_' scripts/device_final.sh)"
R=results
M="dense_mask_budget_mb=4096"
( CUDA_VISIBLE_DEVICES=0 timeout 560 scripts/device_run.sh sweep=decode device=cuda:0 results_dir=$R run_id=h200-decode > $OUT/decode.txt 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 300 scripts/device_run.sh sweep=masks $M device=cuda:0 results_dir=$R run_id=h200-masks-a "masks=$MASKS_A" > $OUT/a.txt 2>&1
  timeout 120 scripts/device_run.sh sweep=masks $M device=cuda:0 results_dir=$R run_id=h200-masks-b "masks=$MASKS_B" > $OUT/b.txt 2>&1
  PYTHONPATH=/tmp/site:$PWD timeout $((560 - SECONDS)) python3 -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_sdpa_split.py tests/test_flex_split.py > $OUT/gpu-tests.txt 2>&1 ) &
wait
PYTHONPATH=$PWD python3 -c "from bench.store import RowStore; [RowStore('$R/'+r).finalize() for r in ('h200-decode', 'h200-masks-a', 'h200-masks-b')]"
tar czf $OUT/runs.tgz $R/h200-decode $R/h200-masks-a $R/h200-masks-b
tail -n 3 $OUT/a.txt $OUT/b.txt $OUT/gpu-tests.txt; grep -v "case/s" $OUT/decode.txt | tail -n 45
