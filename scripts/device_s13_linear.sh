#!/usr/bin/env bash
# Issue 10's next cells (planned in the twelfth session; carry .whl, .triton-cache; `make device-wheel` first), ~540 s:
#   1. h200-linear-delta-fused-c32 (new run): delta_rule / gated_delta_rule with impl triton, solve fused and the own
#      backward kernel (wy_backward: triton) at chunk 32, the largest it runs right on the H200
#      (h200-linear-delta-fused-v3: wrong at 64), 8K ... 1M, fwd and fwd_bwd: is it faster than solve: triton's
#      fwd_bwd (1,523 ms at 1M, chunk 64, h200-linear-delta-solve)?
#   2. h200-linear-delta-fused-tbwd (new run): solve fused at chunk 64 with the PyTorch backward (wy_backward torch,
#      the default): the fused forward's fwd_bwd, valid where -v2's was not;
#   3. fla_delta_rule 512K / 1M (timeout rows retried) in h200-linear-delta-triton, 85 s a case;
#   4. nats_l softmax=flex 8K ... 128K in h200-linear-nats-flex (its 2K rows there; 8K compiled for ~47 s);
#   5. lamamba impl=triton 512K fwd / 1M in h200-linear-lamamba-triton;
#   0. first: h200-linear-delta-fwdo (new run): the fused forward with the chunk outputs written by the chunk-loop
#      kernel (`outputs: triton`, CPU-tested only; replaces chunk_outputs' fp32 GEMM, 1.24 of 7.53 ms at 32K in
#      h200-linear-profile-fused-v2), delta_rule / gated_delta_rule fwd at 32K / 128K / 1M, and its profile at 32K.
#   WRAP_S=545 bash scripts/device_wrap.sh s13-linear scripts/device_s13_linear.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
inv() { sweep_step linear "$@"; }  # inv WALL_S LOG RUN ARGS... (scripts/device_env.sh)
DT=h200-linear-delta-triton
cp -r results/$DT results/h200-linear-lamamba-triton results/h200-linear-nats-flex "$OUT/"
TRI="+method_options.gated_delta_rule.impl=triton +method_options.delta_rule.impl=triton"
FUSED="+method_options.gated_delta_rule.solve=fused +method_options.delta_rule.solve=fused"
C32="+method_options.gated_delta_rule.wy_backward=triton +method_options.delta_rule.wy_backward=triton ++method_options.gated_delta_rule.chunk=32 ++method_options.delta_rule.chunk=32"  # ++: the linear preset sets chunk already (a single + was refused by Hydra in the fourteenth session)
inv ${P0:-60} delta-fwdo h200-linear-delta-fwdo "methods=[delta_rule,gated_delta_rule]" \
  "seq_lens=[32768,131072,1048576]" "modes=[fwd]" $TRI $FUSED +method_options.delta_rule.outputs=triton \
  +method_options.gated_delta_rule.outputs=triton case_timeout_s=30
inv ${P0B:-25} profile-fwdo h200-linear-profile-fwdo "methods=[delta_rule]" "seq_lens=[32768]" "modes=[fwd]" \
  +method_options.delta_rule.impl=triton +method_options.delta_rule.solve=fused \
  +method_options.delta_rule.outputs=triton timing.profile_calls=3 case_timeout_s=25
inv ${P1:-120} delta-fused-c32 h200-linear-delta-fused-c32 "methods=[delta_rule,gated_delta_rule]" \
  "seq_lens=[8192,32768,131072,262144,524288,1048576]" $TRI $FUSED $C32 case_timeout_s=40
inv ${P2:-70} delta-fused-tbwd h200-linear-delta-fused-tbwd "methods=[delta_rule,gated_delta_rule]" \
  "seq_lens=[8192,131072,1048576]" "modes=[fwd_bwd]" $TRI $FUSED case_timeout_s=40
inv ${P3:-110} fla-delta $DT "methods=[fla_delta_rule]" "seq_lens=[524288,1048576]" "retry=[timeout]" case_timeout_s=85
inv ${P4:-100} nats-flex h200-linear-nats-flex "methods=[nats_l]" "seq_lens=[8192,32768,131072]" \
  +method_options.nats_l.softmax=flex correctness.ref_full_pairs=67108864 case_timeout_s=60
inv ${P5:-45} lamamba-triton h200-linear-lamamba-triton "methods=[lamamba]" \
  "seq_lens=[524288,1048576]" +method_options.lamamba.impl=triton case_timeout_s=40
for run in h200-linear-delta-fwdo h200-linear-delta-fused-c32 h200-linear-delta-fused-tbwd h200-linear-nats-flex h200-linear-lamamba-triton $DT; do
  python3 scripts/linear_summary.py "$OUT/$run" > "$OUT/$run-summary.md" 2>&1
done
for f in "$OUT"/*-summary.md; do echo "== $(basename $f)"; head -n 30 "$f"; done
echo "== done after ${SECONDS}s"
