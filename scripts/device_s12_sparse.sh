#!/usr/bin/env bash
# Issue 9's last method cells (planned in the eleventh session; carry .whl, .triton-cache; `make device-wheel`
# first), ~550 s. superlinear is the one method of the issue without 1M rows: its own fwd is 2,553 ms at 256K
# (slope 1.56, 51 % of it the span search: h200-sparse/sparse-summary.md), so a 1M fwd call takes ~20 s and the
# earlier steps' walls cut it. The eleventh session wrote the search as one Triton kernel
# (methods/sparse/superlinear_search_triton.py, `method_options.superlinear.search=triton`, CPU-tested only):
#   1. h200-superlinear-search (a new run: the case key holds no method options): superlinear with search=triton,
#      causal 4K / 16K / 64K / 256K, fwd and fwd_bwd: its rate, routing share, efficiency length and slope;
#   2. the same at 1M, fwd (case budget 120 s), then fwd_bwd (220 s): the 1M cells, or the row that says
#      which phase the budget ended in;
#   3. if the Triton search failed on the GPU (error rows in step 1), the PyTorch search's 1M fwd in h200-sparse.
# The dense baselines' full-mask 1M cells (sdpa_cudnn fwd / fwd_bwd, flex fwd / fwd_bwd; sdpa_cudnn causal 1M
# fwd_bwd) are not run here: ~4-5 dense 1M calls per case (gate, memory, warm-up, timing) are 60-330 s a case.
#   WRAP_S=560 bash scripts/device_wrap.sh s12-sparse scripts/device_s12_sparse.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
RUN=h200-superlinear-search
SEARCH="+method_options.superlinear.search=triton"
T1M=${T1M:-timing.budget_ms=400 timing.min_reps=1}
inv() {  # inv WALL_S LOG RUN ARGS... (sweep_step: scripts/device_env.sh)
  local wall=$1 log=$2; shift 2; sweep_step sparse "$wall" "$log" "$@"
}
cp -r results/h200-sparse "$OUT/"
inv ${S1:-170} search-short $RUN "methods=[superlinear]" "masks=[causal]" \
  "seq_lens=[4096,16384,65536,262144]" "modes=[fwd,fwd_bwd]" $SEARCH case_timeout_s=${CT:-75}
inv ${S2:-130} search-1m-fwd $RUN "methods=[superlinear]" "masks=[causal]" "seq_lens=[1048576]" "modes=[fwd]" \
  $SEARCH case_timeout_s=${CT2:-120} $T1M
inv ${S3:-230} search-1m-bwd $RUN "methods=[superlinear]" "masks=[causal]" "seq_lens=[1048576]" "modes=[fwd_bwd]" \
  $SEARCH case_timeout_s=${CT3:-220} $T1M
if grep -q '"status": "error"' "$OUT/$RUN/rows.jsonl" 2>/dev/null; then
  inv ${S4:-120} torch-1m-fwd h200-sparse "methods=[superlinear]" "masks=[causal]" "seq_lens=[1048576]" \
    "modes=[fwd]" case_timeout_s=110 $T1M
fi
python3 scripts/sparse_summary.py "$OUT/h200-sparse" "$OUT/$RUN" --from "$OUT/$RUN=superlinear" \
  --grid 4096,16384,65536,262144,1048576 > "$OUT/sparse-summary.md" 2>&1
for f in "$OUT"/search-*.txt "$OUT"/torch-*.txt; do
  [ -f "$f" ] || continue
  echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok\|median" -A6 | tail -n 12
done
echo "== done after ${SECONDS}s"
