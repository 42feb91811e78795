#!/usr/bin/env bash
# Issue 10's next H200 rows (planned in the eleventh session; carry .whl, .triton-cache; `make device-wheel`
# first), ~560 s, each into a NEW run unless said (options and code changed since the runs they sit beside):
#   1. h200-linear-delta-fused-v2: the delta rules with impl: triton and solve: fused after the fused WY kernel's
#      blocked inverse (wy_triton.py; in h200-linear-profile-fused its 64-row fp32 forward substitution took 6.0 of
#      the 10.1 ms forward at 32K) and with its own Triton backward (wy_backward: triton; the PyTorch recompute
#      took most of the 44.8 ms fwd_bwd), 8K ... 1M, fwd and fwd_bwd, and profiled at 32K
#      (h200-linear-profile-fused-v2);
#   1b. h200-linear-delta-bf16: impl: triton, solve: triton, dot_precision: bf16 at 32K / 128K / 1M;
#   2. fla_delta_rule 512K / 1M into h200-linear-delta-triton (its tuned configs now come from scripts/device-cache);
#   3. h200-linear-nats-flex: nats_l with its softmax branch through block-sparse FlexAttention (softmax: flex),
#      2K ... 128K, fwd and fwd_bwd (fp32 throughout; ~50 % of chunks routed to softmax at init: quadratic);
#      the gate compares whole references up to 8K only (ref_full_pairs 8192², sampled rows above);
#   4. h200-linear-mem-v3: s4d and abc after the 1M memory fixes (s4d 32K / 128K / 1M, abc 128K / 1M; fwd, fwd_bwd);
#   5. lamamba impl: triton at 256K / 512K / 1M into h200-linear-lamamba-triton;
#   6. simple_gla_triton seg_chunks 16 at 8K and 1M (into h200-linear-gla-seg16): the default (4) changes only if
#      8K does not lose.
#   WRAP_S=560 bash scripts/device_wrap.sh s12-linear scripts/device_s12_linear.sh
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
export TRITON_CACHE_AUTOTUNING=1
inv() { sweep_step linear "$@"; }  # inv WALL_S LOG RUN ARGS... (scripts/device_env.sh)
DT=h200-linear-delta-triton
cp -r results/$DT results/h200-linear-lamamba-triton results/h200-linear-gla-seg16 "$OUT/"
TRI="+method_options.gated_delta_rule.impl=triton +method_options.delta_rule.impl=triton"
FUSED="+method_options.gated_delta_rule.solve=fused +method_options.delta_rule.solve=fused +method_options.gated_delta_rule.wy_backward=triton +method_options.delta_rule.wy_backward=triton"
inv ${P1:-120} delta-fused h200-linear-delta-fused-v2 "methods=[delta_rule,gated_delta_rule]" \
  "seq_lens=[8192,32768,131072,262144,524288,1048576]" $TRI $FUSED case_timeout_s=40
inv ${P2:-25} profile-fused h200-linear-profile-fused-v2 "methods=[delta_rule]" "seq_lens=[32768]" \
  +method_options.delta_rule.impl=triton +method_options.delta_rule.solve=fused +method_options.delta_rule.wy_backward=triton timing.profile_calls=3 \
  case_timeout_s=25
# bf16 operands in the chunk loop and the outputs (dot_precision: bf16, as fla's kernels; fp32 state), with
# solve: triton: the gate (8e-3 in bf16, gradients included) decides whether it can be the default
BF16="+method_options.gated_delta_rule.dot_precision=bf16 +method_options.delta_rule.dot_precision=bf16"
inv ${PB:-60} delta-bf16 h200-linear-delta-bf16 "methods=[delta_rule,gated_delta_rule]" \
  "seq_lens=[32768,131072,1048576]" $TRI $BF16 +method_options.gated_delta_rule.solve=triton \
  +method_options.delta_rule.solve=triton case_timeout_s=35
inv ${P3:-50} fla-delta $DT "methods=[fla_delta_rule]" "seq_lens=[524288,1048576]" "retry=[timeout]" case_timeout_s=50
inv ${P4:-80} nats-flex h200-linear-nats-flex "methods=[nats_l]" "seq_lens=[2048,8192,32768,131072]" \
  +method_options.nats_l.softmax=flex correctness.ref_full_pairs=67108864 case_timeout_s=45
# s4d: FFT convolution in channel groups (group 128, checkpointed); abc: causal segments of 64K tokens
# (checkpointed above one segment) - both CPU-modelled to ~40-55 GiB at 1M; peak_mem_mb checks the model
inv ${P5:-90} mem-v3 h200-linear-mem-v3 "methods=[s4d]" "seq_lens=[32768,131072,1048576]" case_timeout_s=45
inv ${P6:-45} mem-v3-abc h200-linear-mem-v3 "methods=[abc]" "seq_lens=[131072,1048576]" case_timeout_s=40
inv ${P7:-40} lamamba-triton h200-linear-lamamba-triton "methods=[lamamba]" \
  "seq_lens=[262144,524288,1048576]" +method_options.lamamba.impl=triton case_timeout_s=40
for sc in 16; do
  inv ${P8:-25} gla-seg$sc h200-linear-gla-seg$sc "methods=[simple_gla_triton]" "seq_lens=[8192,1048576]" \
    +method_options.simple_gla_triton.seg_chunks=$sc case_timeout_s=20
done
for run in h200-linear-delta-fused-v2 h200-linear-delta-bf16 h200-linear-nats-flex h200-linear-mem-v3 h200-linear-lamamba-triton $DT; do
  python3 scripts/linear_summary.py "$OUT/$run" > "$OUT/$run-summary.md" 2>&1
done
for f in "$OUT"/*-summary.md; do echo "== $(basename $f)"; head -n 30 "$f"; done
echo "== done after ${SECONDS}s"
