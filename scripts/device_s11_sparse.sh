#!/usr/bin/env bash
# Issue 9's last grid cells (planned in the tenth session; carry .whl, .triton-cache; `make device-wheel` first),
# ~530 s: the 27 cells of results/h200-sparse/sparse-summary.md without a row, cheapest first, because every
# earlier call's 1M steps were cut by their walls behind the dense baselines' 1M calls (10-25 s each):
#   1. the sparse methods' full-mask 1M fwd, then fwd_bwd (sparsifiner answers `unsupported` at once: max_seq);
#   2. long_short (strided) full 256K / 1M in results/h200-impl-strided (its committed run);
#   3. superlinear causal 1M, and the dense baselines' 1M cells (sdpa_cudnn full fwd / fwd_bwd and causal fwd_bwd,
#      flex full fwd / fwd_bwd) with a longer case budget (DCT, 110 s): a cell past it is a `timeout` row that says
#      which phase it reached, which is the finding for a dense 1M fwd_bwd (~60 s a call).
#   WRAP_S=540 bash scripts/device_wrap.sh s11-sparse scripts/device_s11_sparse.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
CT=${CT:-75}
DCT=${DCT:-110}
RETRY=${RETRY:-timeout}
T1M=${T1M:-timing.budget_ms=400 timing.min_reps=1}
inv() {  # inv WALL_S LOG PRESET RUN ARGS... (sweep_step: scripts/device_env.sh)
  local wall=$1 log=$2 preset=$3; shift 3; sweep_step "$preset" "$wall" "$log" "$@"
}
cp -r results/h200-sparse results/h200-impl-strided "$OUT/"
SPARSE="methods=[biformer,biformer_2d,biformer_layer,combiner_axial,combiner_fixed,halo_2d,routing,probsparse,sparsifiner]"
ONE_M="seq_lens=[1048576]"
inv ${S1:-130} full-1m-fwd sparse h200-sparse "$SPARSE" "masks=[full]" "$ONE_M" "modes=[fwd]" "retry=[$RETRY]" \
  case_timeout_s=$CT $T1M
inv ${S2:-140} full-1m-bwd sparse h200-sparse "$SPARSE" "masks=[full]" "$ONE_M" "modes=[fwd_bwd]" "retry=[$RETRY]" \
  case_timeout_s=$CT $T1M
inv ${S3:-50} long-short-long sparse_impl h200-impl-strided "methods=[long_short]" "masks=[full]" \
  "seq_lens=[262144,1048576]" "retry=[$RETRY]" case_timeout_s=45
# fwd before fwd_bwd (a sweep runs a length's fwd_bwd cases first): the dense fwd_bwd cells are the likeliest timeouts
inv ${S4:-110} dense-1m-fwd sparse h200-sparse "methods=[superlinear,sdpa_cudnn,flex]" "$ONE_M" "modes=[fwd]" \
  "retry=[$RETRY]" case_timeout_s=$DCT $T1M
inv ${S5:-90} dense-1m-bwd sparse h200-sparse "methods=[superlinear,sdpa_cudnn,flex]" "$ONE_M" "modes=[fwd_bwd]" \
  "retry=[$RETRY]" case_timeout_s=$DCT $T1M
python3 scripts/sparse_summary.py "$OUT/h200-sparse" "$OUT/h200-impl-strided" --from "$OUT/h200-impl-strided=long_short" \
  --grid 4096,16384,65536,262144,1048576 > "$OUT/sparse-summary.md" 2>&1
for f in "$OUT"/full-*.txt "$OUT"/long-*.txt "$OUT"/dense-*.txt; do
  echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok" -A4 | tail -n 6
done
echo "== done after ${SECONDS}s"
