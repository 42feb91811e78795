#!/usr/bin/env bash
# Issue 10 on one H200 (~7 minutes of GPU time at most): the linear family.
#   1. install the wheels (.whl/ and shared/device/wheels/: hydra, omegaconf, fla-core, einops) and attnbench;
#   2. a smoke run of every OWN method at 4K, fwd and fwd_bwd (causal; the full-only ones on the full mask)
#                                                                           -> $OUT/h200-linear-smoke
#   3. the preset conf/sweep/linear.yaml WITHOUT the fla_* methods: own linear-time methods 2K ... 256K, then 1M
#                                                                           -> $OUT/h200-linear
#      + the short-length baselines into the same run: sdpa_cudnn (the efficiency-length yardstick), rfa,
#        delta_rule, simple_gla at 2K ... 128K, softmax_rnn (quadratic) at 2K ... 32K;
#   4. the decode sweep: one new token against a 4K ... 1M context, recurrent steps beside sdpa_cudnn
#                                                                           -> $OUT/h200-linear-decode
#   5. pytest -m gpu tests/test_linear_gpu.py -k "not fla" (own methods) -> $OUT/gpu-tests.txt
#   6. LAST, capped on its own: the fla_* methods (fla-core's Triton kernels) at two lengths (8K, 128K) into
#      h200-linear. Why separate and last: the first call of a Triton method autotunes and compiles -
#      fla_delta_rule's took ~94 s at 2K on the first H200 run, and with the fla_* methods in the main sweep
#      (cases ordered by length) that one case used the whole 100 s cap: 1 of 80 cases recorded. Whatever
#      fla does now, the own methods' rows are already in; fla rows that the cap cuts off are simply absent
#      (the run resumes with the same command).
#   7. scripts/linear_summary.py over both runs                            -> $OUT/linear-summary.md
# Each step has its own time limit (sum of the caps: 40+20+95+75+35+15+40+25+85 = 430 s ~ 7.2 minutes, plus
# the install; less when steps finish early).
set -u
# one wheel per file name (.whl/ first, then shared/device/wheels/): pip refuses a package given twice
declare -A SEEN; WHEELS=""
for w in .whl/*.whl shared/device/wheels/*.whl; do
  [ -f "$w" ] || continue; n=$(basename "$w"); [ -n "${SEEN[$n]:-}" ] && continue; SEEN[$n]=1; WHEELS="$WHEELS $w"
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
# attnbench itself comes as a wheel in .whl/ (pip wheel --no-deps -w .whl .): no build on the device
python3 -c "import attnbench" || { echo "attnbench wheel missing from .whl/"; exit 1; }
export PYTHONUNBUFFERED=1
# Triton autotuning results are cached on disk (triton >= 3.2 knob): a Triton method (fla-core's kernels autotune
# per process: 60-94 s first calls on the H200, h200-linear/device-logs) tunes once per machine, not once per worker.
export TRITON_CACHE_AUTOTUNING=1
python3 -c "import fla, einops, triton; print('fla', fla.__version__, 'triton', triton.__version__)" \
  || echo "fla does not import here: the fla_* rows will be unsupported (method unavailable)"
AB="python3 -m attnbench.cli"
R="results_dir=$OUT"
OWN="[linear_attn,performer,cosformer,gated_delta_rule]"   # conf/sweep/linear.yaml's methods less the fla_* ones
FLA="[fla_linear_attn,fla_simple_gla,fla_delta_rule,fla_gated_delta_rule]"
CAUSAL="[linear_attn,linear_attn_triton,performer,rfa,cosformer,softmax_rnn,gated_delta_rule,delta_rule,simple_gla,abc,aaren,lla,tensor_attn,s4d,nats_l,metamixer,lamamba]"
FULL="[infsa,linear_infsa,nystromformer,linear_attn,performer,metamixer]"
timeout 40 $AB sweep=linear $R run_id=h200-linear-smoke "methods=$CAUSAL" "seq_lens=[4096]" case_timeout_s=30 > $OUT/smoke.txt 2>&1
timeout 20 $AB sweep=linear $R run_id=h200-linear-smoke "methods=$FULL" "seq_lens=[4096]" "masks=[full]" case_timeout_s=30 \
  >> $OUT/smoke.txt 2>&1
# the scaling sweep of the own methods: up to 256K, then 1M in its own invocation (the planner runs short
# cases first, so a slow 256K must not starve the 1M rows)
timeout 95 $AB sweep=linear $R run_id=h200-linear "methods=$OWN" "seq_lens=[2048,8192,32768,131072,262144]" \
  > $OUT/main.txt 2>&1
timeout 75 $AB sweep=linear $R run_id=h200-linear "methods=$OWN" "seq_lens=[1048576]" > $OUT/main1m.txt 2>&1
# the own Triton kernel of linear attention (issue 10: within 1.5x of fla's chunk_linear_attn at 32K and up)
timeout 45 $AB sweep=linear $R run_id=h200-linear "methods=[linear_attn_triton]" \
  "seq_lens=[2048,8192,32768,131072,262144,1048576]" > $OUT/triton.txt 2>&1
timeout 35 $AB sweep=linear $R run_id=h200-linear "methods=[sdpa_cudnn,rfa,delta_rule,simple_gla,abc,aaren,lamamba]" \
  "seq_lens=[2048,8192,32768,131072]" > $OUT/short.txt 2>&1
timeout 15 $AB sweep=linear $R run_id=h200-linear "methods=[softmax_rnn]" "seq_lens=[2048,8192,32768]" \
  > $OUT/rnn.txt 2>&1
timeout 40 $AB sweep=linear $R run_id=h200-linear-decode "modes=[decode]" \
  "methods=[linear_attn,performer,cosformer,gated_delta_rule,simple_gla,abc,sdpa_cudnn]" \
  "seq_lens=[4096,32768,262144,1048576]" > $OUT/decode.txt 2>&1
# own methods only here (the fla_* GPU tests compile Triton kernels: minutes)
timeout 25 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_linear_gpu.py -k "not fla" > $OUT/gpu-tests.txt 2>&1
# fla-core last, at two lengths, capped: its Triton autotuning/compilation (~90 s for a first call) cannot
# starve the rows above (see the header)
timeout 85 $AB sweep=linear $R run_id=h200-linear "methods=$FLA" "seq_lens=[8192,131072]" case_timeout_s=80 \
  > $OUT/fla.txt 2>&1
python3 -c "
from attnbench.record.store import RowStore
for run in ('h200-linear-smoke', 'h200-linear', 'h200-linear-decode'):
    try: RowStore('$OUT/' + run).finalize()
    except Exception as exc: print(run, 'not finalised:', exc)
"
python3 scripts/linear_summary.py $OUT/h200-linear $OUT/h200-linear-decode --smoke $OUT/h200-linear-smoke \
  > $OUT/linear-summary.md 2>&1
for f in smoke main main1m triton short rnn decode fla; do echo "== $f"; grep -v "case/s" $OUT/$f.txt | grep "cases:\|not ok" | tail -n 5; done
tail -n 3 $OUT/gpu-tests.txt; cat $OUT/linear-summary.md | head -n 80
