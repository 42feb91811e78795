#!/usr/bin/env bash
# Issue 10's last H200 cells (planned in the ninth session; carry .whl, .triton-cache; `make device-wheel` first), ~500 s:
#   1. nystromformer (full) 128K ... 1M again in results/h200-linear-long: every cell was `oom` IN ITS REFERENCE
#      (an [L, L] product, 1 TiB at 128K; right to left since the ninth session, tests/test_linear_breadth.py);
#      the cells the ninth session's wall cut: linear_infsa fwd 1M, metamixer (full) 1M;
#   2. fla_delta_rule 256K ... 1M into results/h200-linear-delta-triton (8K-128K there; cut by the step's wall);
#   3. where the time goes (timing.profile_calls, bench/measure/profile.py), a NEW run h200-linear-profile at 32K,
#      causal, fwd and fwd_bwd: the own delta rules and simple_gla with impl: triton (9.2x fla_delta_rule), fla's
#      delta rule, simple_gla_triton and fla_simple_gla (fwd 1.7x), linear_attn_triton and sdpa_cudnn;
#   4. the memory audit's fixes (tests/test_memory_scaling.py, ninth session), a NEW run h200-linear-mem-v2:
#      lamamba 8K ... 1M (its windows now reach a fused SDPA kernel: before, SDPA's math form on 5-D windows, so
#      every committed lamamba row measured that), and the 1M cells that were `oom`: s4d (spectra dropped once
#      used), abc, and the PyTorch chunked linear_attn / cosformer / performer (chunk states prefixed in place).
#   5. delta rules with solve: triton (the WY inverse as an own kernel), a NEW run h200-linear-profile-solve.
#   WRAP_S=500 bash scripts/device_wrap.sh s10-linear scripts/device_s10_linear.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
inv() { sweep_step linear "$@"; }  # inv WALL_S LOG RUN ARGS... (scripts/device_env.sh)
LL=h200-linear-long
DT=h200-linear-delta-triton
cp -r results/$LL results/$DT "$OUT/"
inv ${P1:-100} long-full $LL "methods=[nystromformer,linear_infsa,metamixer]" "masks=[full]" \
  "seq_lens=[131072,262144,524288,1048576]" "retry=[oom]" case_timeout_s=40
inv ${P2:-70} fla-delta $DT "methods=[fla_delta_rule]" "seq_lens=[8192,32768,131072,262144,524288,1048576]" \
  case_timeout_s=40
TRI="+method_options.gated_delta_rule.impl=triton +method_options.delta_rule.impl=triton +method_options.simple_gla.impl=triton"
inv ${P3:-70} profile h200-linear-profile \
  "methods=[delta_rule,gated_delta_rule,simple_gla,fla_delta_rule,simple_gla_triton,fla_simple_gla,linear_attn_triton,sdpa_cudnn]" \
  "seq_lens=[32768]" $TRI timing.profile_calls=3 case_timeout_s=30
# the same delta rules with the WY solve through the own Triton inverse (solve: triton, methods/linear/tril_triton.py;
# ninth session, CPU-tested only): does the ~8 ms of WY pieces at 32K shrink? A run of its own (options are not in
# the case key), 32K and 128K, profiled
SOLVE="+method_options.gated_delta_rule.solve=triton +method_options.delta_rule.solve=triton"
inv ${P6:-50} profile-solve h200-linear-profile-solve "methods=[delta_rule,gated_delta_rule]" "seq_lens=[32768,131072]" \
  +method_options.gated_delta_rule.impl=triton +method_options.delta_rule.impl=triton $SOLVE timing.profile_calls=3 \
  case_timeout_s=30
inv ${P4:-130} mem-v2 h200-linear-mem-v2 "methods=[lamamba]" "seq_lens=[8192,32768,131072,262144,524288,1048576]" \
  case_timeout_s=40
inv ${P5:-60} mem-v2-1m h200-linear-mem-v2 "methods=[s4d,abc,linear_attn,cosformer,performer]" "seq_lens=[1048576]" \
  case_timeout_s=40
python3 - "$OUT/h200-linear-profile" "$OUT/h200-linear-profile-solve" > "$OUT/profile-table.md" 2>&1 <<'PY'
import sys
import pandas as pd
f = pd.concat([pd.read_parquet(run + "/rows.parquet").assign(run=run.rsplit("/", 1)[-1]) for run in sys.argv[1:]])
for _, r in f.sort_values(["run", "method", "mode", "seq_kv"]).iterrows():
    print(r.run, r.seq_kv, end=" ")
    print(f"{r.method} {r['mode']} {r.status}: {r.ms_median} ms, {r.get('profile_launches')} launches, "
          f"{r.get('profile_kernels')} kernels: {r.get('profile_top')}")
PY
cat "$OUT/profile-table.md"
for run in $LL $DT h200-linear-mem-v2; do python3 scripts/linear_summary.py "$OUT/$run" > "$OUT/$run-summary.md" 2>&1; done
echo "== done after ${SECONDS}s"
