#!/usr/bin/env bash
# The foundation's GPU tests and the self-check again (after fixing what the first call found), into $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
timeout -k 10 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_measure_gpu.py -rA > "$OUT/gpu-tests-measure.txt" 2>&1
echo "== gpu tests: exit $? after ${SECONDS}s"
timeout -k 10 90 python3 -m attnbench.cli selfcheck --out "$OUT/selfcheck-h200.json" > "$OUT/selfcheck.txt" 2>&1
echo "== selfcheck: exit $? after ${SECONDS}s"
