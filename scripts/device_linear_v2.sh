#!/usr/bin/env bash
# Issue 10 on one H200: the own Triton kernels as rewritten in the third session (linear_attn_triton: a state
# kernel plus an output kernel parallel over segments; simple_gla_triton: segment-local gate sums, the fix of its
# `wrong` dg) measured for the first time, in a NEW run beside their baselines (the PyTorch chunked forms, fla-core,
# cuDNN): results/h200-linear holds the first versions' rows at 8K-128K, and resuming it skipped them in the
# fifth session (h200-linear/fill-s5). Then fla's GPU tests (the own ones passed in fill-s5: 22 of the file's
# first 22) and the 1M rows of the PyTorch forms.
# Carry .triton-cache with results/h200-linear/fill-s5/triton-autotune.tgz unpacked into it: fla's kernels then
# skip most of their autotuning (a first fwd_bwd call passed 110 s at 32K without it).
#   mkdir -p .triton-cache && tar -xzf results/h200-linear/fill-s5/triton-autotune.tgz -C .triton-cache
#   WRAP_S=560 bash scripts/device_wrap.sh linear-v2 scripts/device_linear_v2.sh      (carry .whl, .triton-cache)
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
AB="python3 -m attnbench.cli"
fin() { python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/$1').finalize()" 2>/dev/null; }
inv() {  # inv WALL_S LOG RUN ARGS...
  local wall=$1 log=$2 run=$3; shift 3
  timeout -k 10 "$wall" $AB sweep=linear device=cuda results_dir="$OUT" run_id=$run "$@" > "$OUT/$log.txt" 2>&1
  echo "== $log: exit $? after ${SECONDS}s"; fin $run
}
V2=h200-linear-triton-v2
inv ${A1:-150} v2-own $V2 "methods=[linear_attn_triton,simple_gla_triton,linear_attn,sdpa_cudnn]" \
  "seq_lens=[8192,32768,131072]" case_timeout_s=40
inv ${A2:-50} v2-gla $V2 "methods=[simple_gla]" "seq_lens=[8192,32768]" case_timeout_s=40
# 1M: the kernels' rows in h200-linear (fifth session) were already the rewritten ones, but two were `oom` in the
# gate's full fp32 reference; long cases now gate on streamed sampled rows (methods/linear/common.py streamed_rows)
inv ${A5:-60} v2-1m $V2 "methods=[linear_attn_triton,simple_gla_triton]" "seq_lens=[1048576]" case_timeout_s=40
inv ${A3:-120} v2-fla $V2 "methods=[fla_linear_attn,fla_simple_gla]" "seq_lens=[8192,32768,131072]" case_timeout_s=100
timeout -k 5 ${GPU_TEST_S:-60} python3 -m pytest -m gpu -q -p no:cacheprovider -k "fla" tests/test_linear_gpu.py \
  > "$OUT/gpu-tests-linear-fla.txt" 2>&1
echo "== gpu-tests-linear-fla: exit $? after ${SECONDS}s"; tail -n 8 "$OUT/gpu-tests-linear-fla.txt"
cp -r results/h200-linear "$OUT/h200-linear"
inv ${A4:-80} linear-1m h200-linear "methods=[linear_attn,performer,cosformer,gated_delta_rule]" \
  "seq_lens=[262144,1048576]" "retry=[oom]" case_timeout_s=30
python3 scripts/linear_summary.py "$OUT/$V2" > "$OUT/linear-v2-summary.md" 2>&1
for f in "$OUT"/v2-*.txt "$OUT"/linear-1m.txt; do echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok" | tail -n 3; done
echo "== done after ${SECONDS}s"
