#!/usr/bin/env bash
# Issue 14's MQAR state sweep (the DSF protocol) on one H200 with a budget the recurrent methods can learn in: on the
# CPU at 400 steps none of them left chance, while at 2,000 steps the gated delta rule reached 0.987 and the delta
# rule 0.962 with a 2,048-number state (results/cpu-analysis-state-sweep, results/cpu-analysis-state-gates).
# conf/suite/analysis.yaml's MQAR (128 tokens, 16 pairs, vocab 256, d_model 64), Q/K width n = 4, 16, 32, 2,000
# steps, every linear / recurrent method beside softmax, PARALLEL cases at once (rows carry `concurrent`).
#   WRAP_S=560 bash scripts/device_wrap.sh state-long scripts/device_state_long.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
P=${PARALLEL:-8}
LIN="[sdpa_efficient,softmax_rnn,linear_attn,linear_attn_triton,performer,cosformer,rfa,abc,simple_gla,simple_gla_triton,delta_rule,gated_delta_rule,normalized_attention,taylor_softmax,softmax_l2out,softmax_divs_gate,lla]"
timeout 520 python3 -m attnbench.cli train suite=analysis results_dir=$OUT run_id=h200-analysis-state-long parallel=$P \
  case_timeout_s=480 tasks=[mqar_state_sweep] "methods=$LIN" task_options.mqar_state_sweep.steps=2000 \
  > $OUT/state-long.txt 2>&1
echo "== state-long: exit $? after ${SECONDS}s"
python3 -c "
from attnbench.record.quality import QualityStore
QualityStore('$OUT/h200-analysis-state-long').finalize()
"
grep -v "run/s" $OUT/state-long.txt | tail -n 25
