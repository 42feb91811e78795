#!/usr/bin/env bash
# One call on the 1-GPU kind: add flex_split to mask half B (its two Sparse Transformer masks: only the new
# cases run), then the GPU-only flex_split tests. Everything comes back as $OUT/runs.tgz.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
eval "$(grep '^MASKS_' scripts/device_final.sh)"
R=results
PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_flex_split.py > $OUT/gpu-tests.txt 2>&1
timeout $((570 - SECONDS)) scripts/device_run.sh sweep=masks dense_mask_budget_mb=4096 device=cuda results_dir=$R run_id=h200-masks-b "masks=$MASKS_B" > $OUT/b.txt 2>&1
PYTHONPATH=$PWD python3 -c "from bench.store import RowStore; RowStore('$R/h200-masks-b').finalize()"
tar czf $OUT/runs.tgz $R/h200-masks-b
tail -n 5 $OUT/gpu-tests.txt; grep -v "case/s" $OUT/b.txt | tail -n 30
