#!/usr/bin/env bash
# Issue 14's hybrid rescue (Deconstructing Attention) in full float32 over three seeds, on one H200: the fifth
# session's h200-analysis-hybrid-v2 trained with TF32 and one seed, and its exact methods disagreed (uniform MQAR:
# sdpa_efficient 0.965, eager 0.100), so single cells there cannot rank methods. Here: the same MQAR config
# (128 tokens, 16 pairs, vocab 256, d_model 64, 2 layers, 400 steps, lr 10^-2), seeds 0-2, uniform and
# hybrid_schedule=first for two exact forms and the weak mixers, and the fixed QK maps (qk_source) with softmax.
#   WRAP_S=560 bash scripts/device_wrap.sh hybrid-fp32 scripts/device_hybrid_fp32.sh      (carry .whl)
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
T="python3 -m attnbench.cli train"
P=${PARALLEL:-12}
RUN=${RUN:-h200-analysis-hybrid-fp32}
step() { echo "== $1: exit $2 after ${SECONDS}s"; }
MQ="task_options.mqar.seq_lens=[128] task_options.mqar.kv_pairs=16 task_options.mqar.vocab=256 task_options.mqar.d_model=64 task_options.mqar.steps=400 task_options.mqar.batch=64 task_options.mqar.layers=2 task_options.mqar.lr=0.01 task_options.mqar.warmup=30"
M="[sdpa_efficient,eager,linear_attn,performer,delta_rule,decon_mlp,decon_nonapprox,taylor2_attention,normalized_attention]"
S="seeds=[0,1,2]"
timeout -k 10 ${A1:-200} $T suite=analysis results_dir=$OUT run_id=$RUN parallel=$P tasks=[mqar] "methods=$M" $S $MQ \
  case_timeout_s=150 > $OUT/hybrid-uniform.txt 2>&1; step uniform $?
timeout -k 10 ${A2:-200} $T suite=analysis results_dir=$OUT run_id=$RUN parallel=$P tasks=[mqar] hybrid_schedule=first \
  "methods=$M" $S $MQ case_timeout_s=150 > $OUT/hybrid-first.txt 2>&1; step first $?
for src in static_emb random_ref fixed_seq; do
  timeout -k 10 ${A3:-45} $T suite=analysis results_dir=$OUT run_id=$RUN parallel=3 tasks=[mqar] qk_source=$src \
    "methods=[sdpa_efficient]" $S $MQ case_timeout_s=40 >> $OUT/fixed-maps.txt 2>&1
done; step fixed-maps $?
python3 -c "from attnbench.record.quality import QualityStore; QualityStore('$OUT/$RUN').finalize()"
grep -hE " ok | diverged | timeout | error " $OUT/hybrid-*.txt $OUT/fixed-maps.txt | tail -n 70
echo "== done after ${SECONDS}s"
