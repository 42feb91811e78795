#!/usr/bin/env bash
# Third-session fill of the committed kernel runs of issues 9 (results/h200-sparse) and 10 (results/h200-linear),
# by RESUMING them: only cases without a row run (retry=[...] re-runs the rows whose statuses are listed). The grid
# the issues ask for is method x {full or natural, causal} x lengths x {fwd, fwd_bwd}; the earlier calls covered
# 4K-32K and parts of 128K-1M. Order here: 16K/64K (the 2-D forms' 128^2 grid and every 64K cell: the slopes need
# a third point >= 16K), then 256K fwd+fwd_bwd, then 1M fwd+fwd_bwd; each invocation has its own wall-clock cap and
# a case_timeout_s so that a case that does not fit is a `timeout` row (the row that says why not), not a hole.
#   PART=sparse | linear | all (default all); caps S1..S3, L1..L3 in seconds
# Before: .whl/ holds the attnbench wheel and hydra/omegaconf/antlr4/fla-core/einops wheels (carry .whl).
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
PART=${PART:-all}
AB="python3 -m attnbench.cli"
fin() { python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/$1').finalize()" 2>/dev/null; }
inv() {  # inv WALL_S LOG PRESET RUN ARGS...
  local wall=$1 log=$2 preset=$3 run=$4; shift 4
  timeout -k 10 "$wall" $AB sweep=$preset device=cuda results_dir="$OUT" run_id=$run "$@" > "$OUT/$log.txt" 2>&1
  echo "== $log: exit $? after ${SECONDS}s"; fin $run
}
if [ "$PART" != linear ]; then
  cp -r results/h200-sparse results/h200-impl-strided results/h200-impl-strided-square "$OUT/"
  # halo and long_short are not resumed in h200-sparse: its rows ran their first implementations (halo gather,
  # long_short flex) before the strided defaults landed; their long lengths resume the implementation runs instead
  M="methods=[sdpa_cudnn,flex,biformer,biformer_2d,biformer_layer,halo_2d,routing,combiner_fixed,combiner_axial,combiner_logsparse,sparsifiner,probsparse,superlinear]"
  # call 1 (S1..S5 of the first version) filled 64K; fwd first here, since timeouts in fwd_bwd ate call 1's 256K/1M caps
  inv ${S1:-75} sparse-256k-fwd sparse h200-sparse "$M" "retry=[oom,timeout]" "seq_lens=[262144]" "modes=[fwd]" case_timeout_s=25
  inv ${S2:-80} sparse-1m-fwd sparse h200-sparse "$M" "retry=[timeout]" "seq_lens=[1048576]" "modes=[fwd]" case_timeout_s=${CT1M:-40}
  inv ${S3:-35} impl-square-1m sparse_impl h200-impl-strided-square "methods=[halo]" method_options.halo.impl=strided_square \
    "seq_lens=[1048576]" "retry=[timeout]" case_timeout_s=30
  inv ${S4:-35} impl-strided-long sparse_impl h200-impl-strided "methods=[long_short]" "seq_lens=[262144,1048576]" \
    "retry=[timeout]" case_timeout_s=30
  inv ${S5:-45} sparse-256k-bwd sparse h200-sparse "$M" "retry=[timeout]" "seq_lens=[262144]" "modes=[fwd_bwd]" case_timeout_s=20
  inv ${S6:-45} sparse-1m-bwd sparse h200-sparse "$M" "retry=[timeout]" "seq_lens=[1048576]" "modes=[fwd_bwd]" case_timeout_s=${CT1M:-40}
  python3 scripts/sparse_summary.py "$OUT/h200-sparse" > "$OUT/sparse-summary.md" 2>&1
fi
if [ "$PART" != sparse ]; then
  cp -r results/h200-linear "$OUT/h200-linear"
  # the own Triton kernels beside fla's at >= 32K (the ratio to fla), then the 1M rows of the own forms
  inv ${L1:-60} linear-triton linear h200-linear "methods=[linear_attn_triton,simple_gla_triton]" \
    "seq_lens=[8192,32768,131072,1048576]" case_timeout_s=40
  inv ${L2:-120} linear-fla linear h200-linear "methods=[fla_linear_attn,fla_simple_gla]" \
    "seq_lens=[32768,131072,1048576]" "retry=[timeout]" case_timeout_s=110
  inv ${L3:-50} linear-1m linear h200-linear "methods=[linear_attn,performer,cosformer,gated_delta_rule]" \
    "seq_lens=[262144,1048576]" case_timeout_s=30
  python3 scripts/linear_summary.py "$OUT/h200-linear" > "$OUT/linear-summary.md" 2>&1
fi
for f in "$OUT"/sparse-*.txt "$OUT"/linear-*.txt; do [ -f "$f" ] && { echo "== $(basename $f)"; grep -v "case/s" "$f" | grep "cases:\|not ok" | tail -n 3; }; done
echo "== done after ${SECONDS}s"
