#!/usr/bin/env bash
# Issue 9's Scale rows at 128K and 512K (planned in the tenth session; carry .whl, .triton-cache;
# `make device-wheel` first), ~460 s. The issue asks for fwd at 128K, 256K, 512K and 1M for every method whose
# memory allows it; the grid of results/h200-sparse has 4K / 16K / 64K / 256K / 1M, and 128K / 512K only for a
# few causal methods. The 2-D methods (biformer_2d, halo_2d) answer `unsupported` at these lengths (not squares):
# rows that say why.
#   1. the sparse methods' 512K fwd, both masks, in results/h200-sparse;
#   2. their full-mask 128K fwd;
#   3. halo (strided_square) and long_short (strided) in their implementation runs, 128K / 512K fwd;
#   4. sdpa_cudnn and flex beside them (the slopes' and rates' yardsticks), 128K / 512K fwd;
#   5. (issue 10) the decode sweep again for abc, linear_attn, performer, cosformer after their step fixes.
#   WRAP_S=500 bash scripts/device_wrap.sh s11-sparse-b scripts/device_s11_sparse_b.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
CT=${CT:-60}
inv() {  # inv WALL_S LOG PRESET RUN ARGS... (sweep_step: scripts/device_env.sh)
  local wall=$1 log=$2 preset=$3; shift 3; sweep_step "$preset" "$wall" "$log" "$@"
}
cp -r results/h200-sparse results/h200-impl-strided results/h200-impl-strided-square "$OUT/"
SPARSE="methods=[biformer,biformer_2d,biformer_layer,halo_2d,routing,combiner_fixed,combiner_axial,combiner_logsparse,sparsifiner,probsparse,superlinear]"
inv ${B1:-150} fwd-512k sparse h200-sparse "$SPARSE" "seq_lens=[524288]" "modes=[fwd]" case_timeout_s=$CT
inv ${B2:-70} fwd-128k sparse h200-sparse "$SPARSE" "seq_lens=[131072]" "modes=[fwd]" case_timeout_s=$CT
inv ${B3:-40} impl-long-short sparse_impl h200-impl-strided "methods=[long_short]" "seq_lens=[131072,524288]" \
  "modes=[fwd]" case_timeout_s=45
inv ${B4:-40} impl-halo sparse_impl h200-impl-strided-square "methods=[halo]" method_options.halo.impl=strided_square \
  "seq_lens=[131072,524288]" "modes=[fwd]" case_timeout_s=45
inv ${B5:-90} dense-128k-512k sparse h200-sparse "methods=[sdpa_cudnn,flex]" "seq_lens=[131072,524288]" "modes=[fwd]" \
  case_timeout_s=$CT
# issue 10's decode rows again, in a new run (room here, not in device_s11_linear.sh): abc after its O(1) step
# (0.22 -> 6.46 ms per step from 4K to 1M in h200-linear-decode: it re-shifted every score), and linear_attn,
# performer, cosformer after their step stopped copying the token position from the host each step
sweep_step linear ${B6:-60} decode-v2 h200-linear-decode-v2 "modes=[decode]" \
  "methods=[abc,linear_attn,performer,cosformer,sdpa_cudnn]" "seq_lens=[4096,32768,262144,1048576]" case_timeout_s=30
python3 scripts/linear_summary.py "$OUT/h200-linear-decode-v2" > "$OUT/h200-linear-decode-v2-summary.md" 2>&1 || true
# the grid of the Done-when (4K ... 1M, fwd and fwd_bwd); 128K / 512K are fwd-only Scale rows, in the slopes
python3 scripts/sparse_summary.py "$OUT/h200-sparse" "$OUT/h200-impl-strided-square" "$OUT/h200-impl-strided" \
  --from "$OUT/h200-impl-strided-square=halo" --from "$OUT/h200-impl-strided=long_short" \
  --grid 4096,16384,65536,262144,1048576 > "$OUT/sparse-summary.md" 2>&1
for f in "$OUT"/fwd-*.txt "$OUT"/impl-*.txt "$OUT"/dense-*.txt; do
  echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok" -A4 | tail -n 6
done
echo "== done after ${SECONDS}s"
