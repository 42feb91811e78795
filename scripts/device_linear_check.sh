#!/usr/bin/env bash
# Issue 10, before the linear fill: the own Triton kernels' first run on a GPU (tests/test_linear_gpu.py: every own
# linear method and fla-core backend through the case runner in bf16 at 2K, fwd and fwd_bwd; linear_attn_triton
# against fla's chunk_linear_attn), so a kernel that fails there shows up as a failed test, not only as `wrong` rows.
#   PART=linear WRAP_S=560 bash scripts/device_wrap.sh linear-s5 scripts/device_linear_check.sh scripts/device_fill_s3.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
timeout -k 5 ${GPU_TEST_S:-120} python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_linear_gpu.py \
  > "$OUT/gpu-tests-linear.txt" 2>&1
echo "== gpu-tests-linear: exit $? after ${SECONDS}s"
tail -n 25 "$OUT/gpu-tests-linear.txt"
