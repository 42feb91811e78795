#!/usr/bin/env bash
# Issue 14's H200 rows that the fifth session's rerun (scripts/device_analysis_s3.sh, V=-v2) left out at its caps,
# resumed into the same run folders (only cases without a row run):
#   1. the 64K fwd kernel rows (5 of 22 in v2: plap_attention's 64K cases held the cap, so they go last)
#   2. latent_xattn(+_flash) cross rows (0 of 24 in v2) and gin_attention's fp32-call rows (6 of 8)
#   3. rf_attention_probe (1 row in v2), the ListOps readouts (HISTOGRAPH vs poolers: none in v2; one run each,
#      side by side), icl_linreg_1layer_mh for the methods without a row (v2 stopped at 48 of the list)
#   WRAP_S=560 bash scripts/device_wrap.sh analysis-rest scripts/device_analysis_rest.sh     (carry .whl)
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
AB="python3 -m attnbench.cli"
T="python3 -m attnbench.cli train"
R="results_dir=$OUT"
V=-v2
step() { echo "== $1: exit $2 after ${SECONDS}s"; }
for run in h200-analysis$V h200-analysis-gin32$V h200-analysis-tasks$V; do cp -r results/$run "$OUT/"; done
K64="[sdpa_cudnn,contmix1d,decon_mlp,decon_nonapprox,gin_attention,normalized_attention,softmax_divs_gate,softmax_l2out,taylor2_attention,taylor_softmax]"
timeout 90 $AB sweep=analysis $R run_id=h200-analysis$V "methods=$K64" "seq_lens=[65536]" "modes=[fwd]" > $OUT/main64k.txt 2>&1; step main64k $?
timeout 60 $AB sweep=analysis $R run_id=h200-analysis$V "methods=[plap_attention]" "seq_lens=[65536]" "modes=[fwd]" \
  case_timeout_s=25 > $OUT/main64k-plap.txt 2>&1; step main64k-plap $?
timeout 45 $AB sweep=analysis $R run_id=h200-analysis$V "methods=[latent_xattn,latent_xattn_flash,sdpa_flash]" \
  "masks=[full]" "seq_lens=[]" "cross_lens=[[64,4096],[64,65536]]" "head_dim=[128,2048]" "modes=[fwd,fwd_bwd]" \
  > $OUT/latent.txt 2>&1; step latent $?
timeout 30 $AB sweep=analysis $R run_id=h200-analysis-gin32$V "methods=[gin_attention]" "seq_lens=[4096,16384]" \
  "modes=[fwd,fwd_bwd]" +method_options.gin_attention.attention_dtype=float32 > $OUT/gin32.txt 2>&1; step gin32 $?
timeout 60 $T suite=analysis $R run_id=h200-analysis-tasks$V tasks=[rf_attention_probe] > $OUT/tasks-rf.txt 2>&1; step rf $?
for ro in pool_mean pool_latent_multilayer histograph_readout; do
  ( timeout 120 $T suite=analysis $R run_id=h200-analysis-readout-$ro tasks=[listops] "methods=[sdpa_efficient]" \
      +task_options.listops.readout=$ro > $OUT/readout-$ro.txt 2>&1; step readout-$ro $? ) &
done
wait
ALL=$(python3 -c "
from attnbench.methods import METHODS
print(','.join(n for n, m in sorted(METHODS.items()) if m.availability()[0] and not n.startswith('fla_')))")
timeout 120 $T suite=analysis $R run_id=h200-analysis-tasks$V parallel=8 tasks=[icl_linreg_1layer_mh] "methods=[$ALL]" \
  > $OUT/tasks-icl.txt 2>&1; step icl $?
python3 -c "
from attnbench.record.store import RowStore
from attnbench.record.quality import QualityStore
for run in ('h200-analysis$V', 'h200-analysis-gin32$V'):
    try: RowStore('$OUT/' + run).finalize()
    except Exception as exc: print(run, 'not finalised:', exc)
for run in ('h200-analysis-tasks$V', 'h200-analysis-readout-pool_mean', 'h200-analysis-readout-pool_latent_multilayer',
            'h200-analysis-readout-histograph_readout'):
    try: QualityStore('$OUT/' + run).finalize()
    except Exception as exc: print(run, 'not finalised:', exc)
"
for f in main64k main64k-plap latent gin32; do echo "== $f"; grep -v "case/s" $OUT/$f.txt | grep "cases:\|not ok" | tail -n 4; done
echo "== done after ${SECONDS}s"
