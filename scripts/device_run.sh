#!/usr/bin/env bash
# Run attnbench on the lent GPU machine (no hydra there: the wheels travel in .whl).
# usage: scripts/device_run.sh ATTNBENCH-ARGS...   (results go where results_dir= says; $OUT on the device)
set -uo pipefail
if ! python3 -c "import hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
exec python3 -m bench.cli "$@"
