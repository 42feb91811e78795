#!/usr/bin/env bash
# One call on one H200 (nvidia-h200), issue 8's re-measure of the mask runs with the foundation v2 harness:
#   1. the GPU test of resident memory (a dense bias built by the builder counts in peak_mem_mb)
#   2. the `masks` sweep at 64K (the length of results/README.md's per-mask winners table), fwd and fwd_bwd, every
#      mask, the exact kernels that run it natively or from a dense mask in its fastest form (cuDNN with an
#      additive bf16 bias built outside the timed call); sdpa_efficient (the slower dense backend) in fwd only
#      -> run h200-masks-v3. The gate at 64K checks a strided sample of query rows, forward only
#      (correctness.ref_full_pairs=2^31; rows carry the grads_not_gated flag): the full fp32 gradient reference at
#      64K cost ~20 s per case in the old runs. Gradients are gated in full at 4K-16K in the other runs.
# Before the call: .whl/ holds the attnbench wheel (pip wheel --no-deps -w .whl .) and hydra-core, omegaconf,
# antlr4 (carry .whl). Run through scripts/device_wrap.sh (everything comes back as one .tgz).
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
R=$OUT/runs
mkdir -p "$R"
timeout -k 5 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_measure_gpu.py -k dense_bias -rA \
  > "$OUT/gpu-test-resident.txt" 2>&1
echo "== gpu test: exit $? after ${SECONDS}s"; tail -n 3 "$OUT/gpu-test-resident.txt"
RUN=h200-masks-v3
sweep() {  # sweep WALL_S LOG ARGS...
  local wall=$1 log=$2; shift 2
  timeout -k 10 "$wall" python3 -m attnbench.cli sweep=masks device=cuda results_dir="$R" run_id="$RUN" \
    "seq_lens=[65536]" correctness.ref_full_pairs=2147483648 case_timeout_s=120 "$@" > "$OUT/$log.txt" 2>&1
  echo "== $log: exit $? after ${SECONDS}s"
  python3 -c "from attnbench.record.store import RowStore; RowStore('$R/$RUN').finalize()" 2>/dev/null
}
sweep ${FWD_S:-200} fwd "modes=[fwd]" \
  "methods=[sdpa_cudnn,flex,torch_varlen,flex_split,cudnn_split,sdpa_flash,sdpa_efficient,eager]"
sweep ${BWD_S:-330} fwd_bwd "modes=[fwd_bwd]" \
  "methods=[sdpa_cudnn,flex,torch_varlen,flex_split,cudnn_split,sdpa_flash]"
grep -h "cases:\|not ok" "$OUT"/fwd.txt "$OUT"/fwd_bwd.txt | grep -v "case/s" | tail -n 20
echo "== done after ${SECONDS}s"
