#!/usr/bin/env bash
# The twelfth session's last call (~220 s; carry .whl, .triton-cache): why the fused WY pieces' backward kernel
# (wy_backward: triton) gated wrong on the H200 (delta_rule dk rel_err 0.42, gated_delta_rule dg 0.011 at 8K
# and 32K in h200-linear-delta-fused-v2) where the interpreter agrees: scripts/wy_backward_check.py, one line
# per kernel variant; then the two 1M fwd cases the earlier call's wall cut from h200-linear-delta-fused-v2.
#   WRAP_S=220 bash scripts/device_wrap.sh s12-c scripts/device_s12_c.sh
set -u
. scripts/device_env.sh
timeout -k 5 ${W1:-120} python3 scripts/wy_backward_check.py > "$OUT/wy-backward-check.txt" 2>&1
echo "== wy-backward-check: exit $? after ${SECONDS}s"
cat "$OUT/wy-backward-check.txt" | tail -n 20
cp -r results/h200-linear-delta-fused-v2 "$OUT/"
TRI="+method_options.gated_delta_rule.impl=triton +method_options.delta_rule.impl=triton"
FUSED="+method_options.gated_delta_rule.solve=fused +method_options.delta_rule.solve=fused +method_options.gated_delta_rule.wy_backward=triton +method_options.delta_rule.wy_backward=triton"
sweep_step linear ${W2:-80} delta-fused-1m h200-linear-delta-fused-v2 "methods=[delta_rule,gated_delta_rule]" \
  "seq_lens=[1048576]" "modes=[fwd]" $TRI $FUSED case_timeout_s=35
tr '\r' '\n' < "$OUT/delta-fused-1m.txt" | grep -v "case/s" | tail -n 12
echo "== done after ${SECONDS}s"
