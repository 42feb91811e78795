#!/usr/bin/env bash
# Issue 9: the superlinear package (0.1.0) as superlinear_pkg on one H200, after the fifth session's fix (its
# equal-heads prefill passed search_power to a span kernel without it: every case `error` in results/h200-sparse-pkg;
# the method now calls the package's GQA entry). The GPU tests (the gate in bf16, fwd and fwd_bwd; the Triton search
# against the own search), then the rows, resumed into h200-sparse-pkg with retry=[error].
# .whl must hold superlinear-0.1.0-py3-none-any.whl (../shared/device/wheels/).
#   WRAP_S=200 bash scripts/device_wrap.sh superlinear-pkg scripts/device_superlinear_pkg.sh      (carry .whl)
set -u
. scripts/device_env.sh  # OUT, the carried wheels installed, PYTHONPATH
timeout -k 5 ${GPU_TEST_S:-70} python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_superlinear_pkg.py \
  > "$OUT/gpu-tests-superlinear-pkg.txt" 2>&1
echo "== superlinear-pkg tests: exit $? after ${SECONDS}s"; tail -n 12 "$OUT/gpu-tests-superlinear-pkg.txt"
cp -r results/h200-sparse-pkg "$OUT/"
timeout -k 10 ${ROWS_S:-100} python3 -m attnbench.cli sweep=sparse device=cuda results_dir=$OUT run_id=h200-sparse-pkg \
  "methods=[superlinear_pkg,superlinear]" "masks=[causal]" "seq_lens=[16384,65536]" "retry=[error]" case_timeout_s=25 \
  > $OUT/sparse-pkg.txt 2>&1
echo "== sparse-pkg: exit $? after ${SECONDS}s"
python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/h200-sparse-pkg').finalize()"
grep -v "case/s" $OUT/sparse-pkg.txt | grep "cases:\|not ok\|error\|wrong" | tail -n 8
