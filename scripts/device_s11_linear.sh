#!/usr/bin/env bash
# Issue 10's last H200 rows (planned in the tenth session; carry .whl, .triton-cache; `make device-wheel` first),
# ~560 s, each into a NEW run (options and code changed since the runs they sit beside):
#   1. h200-linear-short: the methods with no H200 timing yet or only `unsupported` rows, at the lengths they are
#      built for: tensor_attn (cubic) and lla (O(L² d²)) at 128 / 512 (max_len 512: 2K is their row saying why),
#      softmax_rnn (exact, quadratic) causal 128 ... 8K, infsa (quadratic, full) 2K ... 32K, sdpa_cudnn beside;
#   2. h200-linear-nystrom-v2: nystromformer full 32K ... 1M after its landmarks' fix (segment_means; the fwd_bwd
#      slope was 1.45 in h200-linear-long);
#   3. (abc's decode after its O(1) step moved to scripts/device_s11_sparse_b.sh's decode-v2 step: room here)
#   4. h200-linear-delta-solve: the delta rules with impl: triton AND solve: triton (17-25 % faster at 32K / 128K
#      in h200-linear-profile-solve), 8K ... 1M: the family's best own figures;
#   5. h200-linear-profile-fused: the delta rules and simple_gla with solve: fused (wy_triton.py), profiled;
#   6. h200-linear-lamamba-triton: lamamba's scan through the Triton loop (impl: triton), 32K / 128K;
#   7. fla_delta_rule 512K / 1M into h200-linear-delta-triton (cut twice by step walls; its tuning is cached now).
#   8. simple_gla_triton at seg_chunks 8 and 16 (new runs h200-linear-gla-seg8, -seg16).
#   WRAP_S=560 bash scripts/device_wrap.sh s11-linear scripts/device_s11_linear.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
inv() { sweep_step linear "$@"; }  # inv WALL_S LOG RUN ARGS... (scripts/device_env.sh)
DT=h200-linear-delta-triton
cp -r results/$DT "$OUT/"
inv ${P1:-70} short-causal h200-linear-short "methods=[tensor_attn,lla,softmax_rnn,sdpa_cudnn]" "masks=[causal]" \
  "seq_lens=[128,512,2048,8192]" case_timeout_s=30
inv ${P2:-45} short-full h200-linear-short "methods=[infsa,sdpa_cudnn]" "masks=[full]" \
  "seq_lens=[2048,8192,32768]" case_timeout_s=30
inv ${P3:-70} nystrom h200-linear-nystrom-v2 "methods=[nystromformer]" "masks=[full]" \
  "seq_lens=[32768,131072,262144,524288,1048576]" case_timeout_s=40
TRI="+method_options.gated_delta_rule.impl=triton +method_options.delta_rule.impl=triton"
SOLVE="+method_options.gated_delta_rule.solve=triton +method_options.delta_rule.solve=triton"
inv ${P5:-120} delta-solve h200-linear-delta-solve "methods=[delta_rule,gated_delta_rule]" \
  "seq_lens=[8192,32768,131072,262144,524288,1048576]" $TRI $SOLVE case_timeout_s=40
# the fused WY preparation (solve: fused, methods/linear/wy_triton.py, merged in the tenth session, CPU-tested only),
# profiled beside solve: triton: does it take the ~30 launches of PyTorch glue away? (fwd_bwd recomputes the pieces
# in PyTorch for its backward: no training gain expected)
FUSED="+method_options.gated_delta_rule.solve=fused +method_options.delta_rule.solve=fused +method_options.simple_gla.solve=fused"
inv ${P7:-60} profile-fused h200-linear-profile-fused "methods=[delta_rule,gated_delta_rule,simple_gla]" \
  "seq_lens=[32768,131072]" $TRI +method_options.simple_gla.impl=triton $FUSED timing.profile_calls=3 case_timeout_s=30
# lamamba's SSD scan through the gated variants' Triton loop (impl: triton, tenth session, CPU-tested only): its
# fused-window rows (h200-linear-mem-v2) ran the PyTorch chunk loop
inv ${P8:-35} lamamba-triton h200-linear-lamamba-triton "methods=[lamamba]" "seq_lens=[32768,131072]" \
  +method_options.lamamba.impl=triton case_timeout_s=30
inv ${P6:-60} fla-delta $DT "methods=[fla_delta_rule]" "seq_lens=[524288,1048576]" case_timeout_s=40
# last (cut first if the wall comes): simple_gla_triton at seg_chunks 8 and 16 (1 / 2 / 4 were slower to faster:
# 1.18 / 1.12 / 1.04 ms fwd at 32K, h200-linear-gla-seg1/-seg2 and h200-linear-triton-v3: does the trend go on?)
for sc in 8 16; do
  inv ${P9:-25} gla-seg$sc h200-linear-gla-seg$sc "methods=[simple_gla_triton]" "seq_lens=[32768,131072]" \
    +method_options.simple_gla_triton.seg_chunks=$sc case_timeout_s=20
done
for run in h200-linear-short h200-linear-nystrom-v2 h200-linear-delta-solve h200-linear-profile-fused $DT; do
  python3 scripts/linear_summary.py "$OUT/$run" > "$OUT/$run-summary.md" 2>&1
done
for f in "$OUT"/*-summary.md; do echo "== $(basename $f)"; head -n 30 "$f"; done
echo "== done after ${SECONDS}s"
