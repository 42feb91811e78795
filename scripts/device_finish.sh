#!/usr/bin/env bash
# One call on the 4-GPU kind that completes the committed runs (results/README.md):
#   GPU 0: re-run the 11 stale flex-bwd error rows of h200x2-gpu, time every mask's BlockMask / block layout /
#          visible-pair count at 128K tokens (results/h200-mask-build), a clean interleaved self-check, then
#          the GPU-only tests;
#   GPU 1: resume mask half A;   GPUs 2-3: resume mask half B (one process, two workers sharing its queue).
# Smallest cases run first; the tables are finalized here; everything comes back as $OUT/runs.tgz.
set -u
eval "$(grep '^MASKS_' scripts/device_final.sh)"
# install the wheels once, before the parallel runs (device_run.sh then finds hydra and skips it)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
R=results
M="dense_mask_budget_mb=4096"
mapfile -t MASKS_ALL < <(sed -n '/^masks:/,/^[a-z_]*: /p' conf/sweep/masks.yaml | sed -n 's/^  - //p')
( CUDA_VISIBLE_DEVICES=2,3 timeout 545 scripts/device_run.sh sweep=masks $M device=cuda results_dir=$R run_id=h200-masks-b "masks=$MASKS_B" > $OUT/b.txt 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 545 scripts/device_run.sh sweep=masks $M device=cuda:0 results_dir=$R run_id=h200-masks-a "masks=$MASKS_A" > $OUT/a.txt 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=0
  timeout 200 scripts/device_run.sh sweep=gpu device=cuda:0 results_dir=$R run_id=h200x2-gpu retry=[error] case_timeout_s=180 > $OUT/gpu.txt 2>&1
  mkdir -p $R/h200-mask-build
  timeout 120 scripts/device_run.sh masks time --device cuda:0 --repeats 5 --out $R/h200-mask-build/defaults-128k.json > $OUT/build.txt 2>&1
  timeout 90 scripts/device_run.sh masks time "${MASKS_ALL[@]}" --device cuda:0 --repeats 5 --out $R/h200-mask-build/sweep-128k.json >> $OUT/build.txt 2>&1
  timeout 120 scripts/device_run.sh selfcheck --rounds 3 --out $R/selfcheck-h200.json > $OUT/selfcheck.txt 2>&1
  PYTHONPATH=/tmp/site:$PWD timeout $((540 - SECONDS)) python3 -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_masks_gpu.py tests/test_masks_perf.py tests/test_measure.py tests/test_runner.py > $OUT/gpu-tests.txt 2>&1 ) &
wait
PYTHONPATH=$PWD python3 -c "from bench.store import RowStore; [RowStore('$R/'+r).finalize() for r in ('h200x2-gpu', 'h200-masks-a', 'h200-masks-b')]"
tar czf $OUT/runs.tgz $R/h200x2-gpu $R/h200-masks-a $R/h200-masks-b $R/h200-mask-build $R/selfcheck-h200.json
tail -n 3 $OUT/gpu.txt $OUT/a.txt $OUT/b.txt $OUT/selfcheck.txt $OUT/gpu-tests.txt; cat $OUT/build.txt
