#!/usr/bin/env bash
# One call on one H200: the fast paths added since the first runs, measured, and the MQAR reproduction at
# Zoology's second learning rate.
#   1. linear_attn_triton (own Triton chunked kernel) beside fla's chunk_linear_attn and the own PyTorch
#      chunked linear_attn, 2K (gradients gated in full), 32K, 128K, 1M, fwd and fwd_bwd -> resumes h200-linear
#   2. halo / long_short implementations (sweep=sparse_impl), one run per impl; 4K added so gradients are gated in
#      full on the GPU (longer cases gate a sample of rows, forward only) -> h200-impl-*
#   3. MQAR (suite=mqar: 256 tokens, 64 pairs, 2 layers, d_model 128, 2000 steps) at lr 10^-2.5 (Zoology sweeps
#      logspace(-3, -1.5, 4); h200-mqar has lr 1e-3: 97.9 %) for softmax (sdpa_cudnn) and linear_attn
#      -> h200-mqar-lr3
# Before: .whl/ holds the attnbench wheel plus hydra/omegaconf/antlr4/fla-core/einops wheels (carry .whl).
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
# Triton autotuning results are cached on disk (triton >= 3.2 knob): a Triton method (fla-core's kernels autotune
# per process: 60-94 s first calls on the H200, h200-linear/device-logs) tunes once per machine, not once per worker.
export TRITON_CACHE_AUTOTUNING=1
AB="python3 -m attnbench.cli"
fin() { python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/$1').finalize()" 2>/dev/null; }
inv() {  # inv WALL_S LOG PRESET RUN ARGS...
  local wall=$1 log=$2 preset=$3 run=$4; shift 4
  timeout -k 10 "$wall" $AB sweep=$preset device=cuda results_dir="$OUT" run_id=$run "$@" > "$OUT/$log.txt" 2>&1
  echo "== $log: exit $? after ${SECONDS}s"; fin $run
}
cp -r results/h200-linear "$OUT/h200-linear"
inv ${L1:-130} linear-triton linear h200-linear "methods=[linear_attn_triton,fla_linear_attn,linear_attn]" \
  "seq_lens=[2048,32768,131072,1048576]" case_timeout_s=60
IMPL="seq_lens=[4096,16384,65536,262144]"
inv ${S1:-70} impl-strided sparse_impl h200-impl-strided "methods=[halo,long_short]" "$IMPL"
inv ${S2:-30} impl-base sparse_impl h200-impl-strided "methods=[sdpa_cudnn,flex]" "seq_lens=[4096,16384,65536]"
inv ${S3:-30} impl-square sparse_impl h200-impl-strided-square "methods=[halo]" "$IMPL" method_options.halo.impl=strided_square
inv ${S4:-25} impl-gather sparse_impl h200-impl-gather "methods=[halo]" "$IMPL" method_options.halo.impl=gather
inv ${S5:-45} impl-flex sparse_impl h200-impl-flex "methods=[halo,long_short]" "seq_lens=[4096,16384,65536]" \
  method_options.halo.impl=flex method_options.long_short.impl=flex
timeout -k 10 ${M1:-240} $AB train suite=mqar "methods=[sdpa_cudnn,linear_attn]" task_options.mqar.lr=0.0031623 \
  case_timeout_s=115 results_dir="$OUT" run_id=h200-mqar-lr3 > "$OUT/mqar.txt" 2>&1
echo "== mqar: exit $? after ${SECONDS}s"
for f in "$OUT"/linear-*.txt "$OUT"/impl-*.txt; do echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok" | tail -n 4; done
tail -n 4 "$OUT/mqar.txt"
echo "== done after ${SECONDS}s"
