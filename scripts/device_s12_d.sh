#!/usr/bin/env bash
# After device_s12_c.sh reproduced the wrong backward on the H200 (scripts/wy_backward_check.py: dk 0.24, dβ 0.07
# for delta_rule): the backward kernel builds Aᵀ as the forward does (no tl.trans before the blocked inverse's
# reshape). The check again (default kernel only), then the gated cases in a new run, h200-linear-delta-fused-v3.
#   WRAP_S=100 bash scripts/device_wrap.sh s12-d scripts/device_s12_d.sh
set -u
. scripts/device_env.sh
timeout -k 5 ${W1:-40} python3 scripts/wy_backward_check.py --base-only > "$OUT/wy-backward-check.txt" 2>&1
echo "== wy-backward-check: exit $? after ${SECONDS}s"; cat "$OUT/wy-backward-check.txt" | tail -n 8
TRI="+method_options.gated_delta_rule.impl=triton +method_options.delta_rule.impl=triton"
FUSED="+method_options.gated_delta_rule.solve=fused +method_options.delta_rule.solve=fused +method_options.gated_delta_rule.wy_backward=triton +method_options.delta_rule.wy_backward=triton"
sweep_step linear ${W2:-55} delta-fused-v3 h200-linear-delta-fused-v3 "methods=[delta_rule,gated_delta_rule]" \
  "seq_lens=[8192,32768]" "modes=[fwd_bwd]" $TRI $FUSED case_timeout_s=30
tr '\r' '\n' < "$OUT/delta-fused-v3.txt" | grep -v "case/s" | tail -n 10
echo "== done after ${SECONDS}s"
