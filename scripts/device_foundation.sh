#!/usr/bin/env bash
# One call on one H200 (nvidia-h200): the foundation issue's GPU evidence.
#   1. the measuring stage's GPU tests (timer, CUDA graphs, memory, telemetry, calibration, the 1 % gate at 4K/64K)
#   2. attnbench selfcheck (the harness's timer against triton.testing.do_bench)
#   3. core re-measure with the new gate, memory, telemetry and flex's full path: full and causal, 16K and 64K,
#      fwd and fwd_bwd, hd 128, bf16 (run h200-core-v2)
#   4. dense-mask baselines in their fastest form (an additive bf16 bias) beside flex and FA2 varlen on the masks
#      whose margins the README quotes, 64K fwd (run h200-masks-v2)
# Before the call: .whl/ holds the attnbench wheel (pip wheel --no-deps -w .whl .) and hydra-core, omegaconf,
# antlr4 (carry .whl). Results come back as $OUT/foundation.tgz plus the text logs.
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
R=$OUT/runs
mkdir -p "$R"
cd /tmp && python3 -c "import attnbench, sys; print('attnbench from', attnbench.__file__)" && cd - >/dev/null

timeout -k 10 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_measure_gpu.py -x -rA \
  > "$OUT/gpu-tests-measure.txt" 2>&1
echo "== gpu tests: exit $? after ${SECONDS}s"
timeout -k 10 60 python3 -m attnbench.cli selfcheck --out "$R/selfcheck-h200.json" > "$OUT/selfcheck.txt" 2>&1
echo "== selfcheck: exit $? after ${SECONDS}s"

sweep() {  # sweep WALL_S RUN ARGS...
  local wall=$1 run=$2; shift 2
  timeout -k 10 "$wall" python3 -m attnbench.cli device=cuda results_dir="$R" run_id="$run" "$@" > "$OUT/$run.txt" 2>&1
  echo "== $run: exit $? after ${SECONDS}s"
  python3 -c "from attnbench.record.store import RowStore; RowStore('$R/$run').finalize()" 2>/dev/null
}
sweep 200 h200-core-v2 sweep=gpu "methods=[sdpa_cudnn,sdpa_flash,flex,flex_full_blockmask,torch_varlen]" \
  "seq_lens=[16384,65536]" "head_dim=[128]" "modes=[fwd,fwd_bwd]"
sweep 120 h200-masks-v2 sweep=masks "methods=[flex,sdpa_cudnn,torch_varlen]" "seq_lens=[65536]" "modes=[fwd]" \
  "masks=['sliding_window(left=4096)','document(mean_length=4096)','bigbird(block=128,global_blocks=2,window_blocks=3,random_blocks=3)','longformer(left=2048,right=2048,global_tokens=64)']"
tar -czf "$OUT/foundation.tgz" -C "$R" . 2>/dev/null
echo "== done after ${SECONDS}s"
