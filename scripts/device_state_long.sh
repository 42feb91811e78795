#!/usr/bin/env bash
# Issue 14's MQAR state sweep (the DSF protocol) on one H200 with a budget the recurrent methods can learn in: on the
# CPU at 400 steps none of them left chance, while at 2,000 steps the gated delta rule reached 0.987 and the delta
# rule 0.962 with a 2,048-number state (results/cpu-analysis-state-sweep, results/cpu-analysis-state-gates).
# conf/suite/analysis.yaml's MQAR (128 tokens, 16 pairs, vocab 256, d_model 64), Q/K width n = 4, 16, 32, 2,000
# steps, every linear / recurrent method beside softmax, PARALLEL cases at once (rows carry `concurrent`).
# The fifth session's run (results/h200-analysis-state-long, seed 0) trained with TF32 matmuls, the float32
# methods' own included, and its delta rules fell to 0.135 at n = 32 where the CPU's full float32 gave 0.96-0.99:
# this run is full float32 (the train key tf32, default false since) and SEEDS seeds, so a seed's swing and TF32's
# effect can be told apart (seed 0 here against seed 0 there).
#   WRAP_S=560 bash scripts/device_wrap.sh state-fp32 scripts/device_state_long.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
P=${PARALLEL:-10}
SEEDS=${SEEDS:-[0,1,2]}
RUN=${RUN:-h200-analysis-state-fp32}
# the methods with a fixed-size state, beside softmax (the softmax variants and lla reached 0.99 at n = 16 and 32 in
# the TF32 run; the Triton twins compute the PyTorch forms' operators): 10 methods x 3 seeds in ~3 waves of PARALLEL
LIN=${LIN:-"[sdpa_efficient,linear_attn,performer,cosformer,rfa,abc,simple_gla,delta_rule,gated_delta_rule,normalized_attention]"}
timeout 520 python3 -m attnbench.cli train suite=analysis results_dir=$OUT run_id=$RUN parallel=$P seeds=$SEEDS \
  case_timeout_s=500 tasks=[mqar_state_sweep] "methods=$LIN" task_options.mqar_state_sweep.steps=2000 \
  > $OUT/state-long.txt 2>&1
echo "== state-long: exit $? after ${SECONDS}s"
python3 -c "
from attnbench.record.quality import QualityStore
QualityStore('$OUT/$RUN').finalize()
"
grep -v "run/s" $OUT/state-long.txt | tail -n 25
