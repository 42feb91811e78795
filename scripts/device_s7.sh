#!/usr/bin/env bash
# The seventh session's first H200 call: what the sixth session's four calls left for issues 10 and 14.
#   1. icl_linreg_1layer_mh for the methods that need extra inputs or a prepare step (performer, rfa, simple_gla,
#      the delta rules, abc, superlinear): their rows in h200-analysis-tasks-v2 are the fifth session's
#      `unsupported` ones, written before the experiment took extras; retry=[unsupported] re-runs exactly those
#      (the others stay: their reasons are the method's, e.g. no causal form).
#   2. linear_attn_triton with its new backward (the dD terms folded into the scans: no PyTorch cumsum along the
#      sequence, which cost ~0.4 us a row; phi' in the scan epilogue; one state pass) in a NEW run beside the
#      PyTorch chunked linear_attn and simple_gla_triton (h200-linear-triton-v2 holds the old backward: fwd_bwd
#      138 ms at 128K against PyTorch's 53.4), then at num_warps=8 (fewer register spills) in its own run.
#   3. fla-core's linear_attn and simple_gla in h200-linear-triton-v2, resumed with retry=[error] (the bshd
#      gradient defect of the gate, fixed since), 8K / 32K / 128K, a long first call allowed (autotuning): the
#      own/fla ratio at >= 32K. Last, since it can hold the rest of the call.
# Carry .whl and .triton-cache (unpack results/h200-linear-triton-v2/device-logs/triton-autotune.tgz into it):
#   mkdir -p .triton-cache && tar -xzf results/h200-linear-triton-v2/device-logs/triton-autotune.tgz -C .triton-cache
#   WRAP_S=560 bash scripts/device_wrap.sh s7 scripts/device_s7.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
AB="python3 -m attnbench.cli"
step() { echo "== $1: exit $2 after ${SECONDS}s"; }
fin() { python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/$1').finalize()" 2>/dev/null; }
for run in h200-analysis-tasks-v2 h200-linear-triton-v2; do cp -r results/$run "$OUT/"; done

EXTRAS="[performer,rfa,simple_gla,simple_gla_triton,delta_rule,gated_delta_rule,abc,superlinear]"
timeout -k 10 ${A1:-150} $AB train suite=analysis results_dir=$OUT run_id=h200-analysis-tasks-v2 parallel=8 \
  tasks=[icl_linreg_1layer_mh] "methods=$EXTRAS" "retry=[unsupported]" case_timeout_s=140 > $OUT/icl-extras.txt 2>&1
step icl-extras $?
python3 -c "from attnbench.record.quality import QualityStore; QualityStore('$OUT/h200-analysis-tasks-v2').finalize()"

V3=h200-linear-triton-v3
timeout -k 10 ${A2:-120} $AB sweep=linear device=cuda results_dir=$OUT run_id=$V3 \
  "methods=[linear_attn_triton,linear_attn,simple_gla_triton]" "seq_lens=[8192,32768,131072,1048576]" \
  case_timeout_s=40 > $OUT/v3-own.txt 2>&1
step v3-own $?; fin $V3
# the new dq/dk scans spill ~2.5 KB a thread at 4 warps (ptxas, scripts/triton_spills.py), ~0.2-0.3 KB at 8: the
# same kernel at num_warps=8 in its own run (a case key holds no method options). The seventh session's call
# had '+method_options...' here, which Hydra refused (the key exists): that step wrote no rows.
timeout -k 10 ${A4:-60} $AB sweep=linear device=cuda results_dir=$OUT run_id=$V3-w8 "methods=[linear_attn_triton]" \
  "seq_lens=[32768,131072,1048576]" method_options.linear_attn_triton.num_warps=8 case_timeout_s=40 \
  > $OUT/v3-w8.txt 2>&1
step v3-w8 $?; fin $V3-w8

timeout -k 10 ${A3:-200} $AB sweep=linear device=cuda results_dir=$OUT run_id=h200-linear-triton-v2 \
  "methods=[fla_linear_attn,fla_simple_gla]" "seq_lens=[8192,32768,131072]" "retry=[error]" case_timeout_s=200 \
  > $OUT/v2-fla.txt 2>&1
step v2-fla $?; fin h200-linear-triton-v2
python3 scripts/linear_summary.py "$OUT/h200-linear-triton-v2" > "$OUT/linear-v2-summary.md" 2>&1
python3 scripts/linear_summary.py "$OUT/$V3" > "$OUT/linear-v3-summary.md" 2>&1
grep -E " ok | unsupported | error " $OUT/icl-extras.txt | tail -n 12
for f in v3-own v3-w8 v2-fla; do echo "== $f"; grep -v "case/s" $OUT/$f.txt | grep "cases:\|not ok" -A3 | tail -n 6; done
echo "== done after ${SECONDS}s"
