#!/usr/bin/env bash
# One call on the 4-GPU kind that adds torch_varlen (torch.nn.attention.varlen) to the committed runs by
# resuming them with the sweeps' new method lists (only the new cases run):
#   GPUs 0-1: mask half B (its masks have no varlen form: unsupported rows only), then half A (two workers);
#   GPUs 2-3: the core gpu sweep (two workers), then the GPU-only torch_varlen tests on GPU 2.
# Everything comes back as $OUT/runs.tgz; untar it over the repository and regenerate the reports.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
eval "$(grep '^MASKS_' scripts/device_final.sh)"
R=results
M="dense_mask_budget_mb=4096"
python3 -c "import torch, inspect; from torch.nn.attention.varlen import varlen_attn as f; print(torch.__version__, inspect.signature(f))" > $OUT/probe.txt 2>&1
( export CUDA_VISIBLE_DEVICES=0,1
  timeout 60 scripts/device_run.sh sweep=masks $M device=cuda results_dir=$R run_id=h200-masks-b "masks=$MASKS_B" > $OUT/b.txt 2>&1
  timeout $((560 - SECONDS)) scripts/device_run.sh sweep=masks $M device=cuda results_dir=$R run_id=h200-masks-a "masks=$MASKS_A" > $OUT/a.txt 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2,3
  timeout 420 scripts/device_run.sh sweep=gpu device=cuda results_dir=$R run_id=h200x2-gpu > $OUT/gpu.txt 2>&1
  CUDA_VISIBLE_DEVICES=2 PYTHONPATH=/tmp/site:$PWD timeout $((560 - SECONDS)) python3 -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_torch_varlen.py > $OUT/gpu-tests.txt 2>&1 ) &
wait
PYTHONPATH=$PWD python3 -c "from bench.store import RowStore; [RowStore('$R/'+r).finalize() for r in ('h200x2-gpu', 'h200-masks-a', 'h200-masks-b')]"
tar czf $OUT/runs.tgz $R/h200x2-gpu $R/h200-masks-a $R/h200-masks-b
cat $OUT/probe.txt; tail -n 3 $OUT/gpu.txt $OUT/a.txt $OUT/b.txt $OUT/gpu-tests.txt
