# Sourced by the device scripts (`. scripts/device_env.sh`): the results folder, and the wheels carried in .whl/
# (attnbench itself, hydra-core, omegaconf, antlr4, fla-core, einops) installed into $SITE (/tmp/site), which
# goes on PYTHONPATH. An install that fails ends the script with the installer's last lines.
OUT=${OUT:-$PWD/results}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  > "$OUT/install.txt" 2>&1 || { tail -n 20 "$OUT/install.txt"; exit 1; }
export PYTHONPATH=$SITE:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1

# The steps' helpers (scripts since the eighth session use them; older scripts keep their own copies):
#   fin RUN                                    finalize a run folder under $OUT (parquet/csv from rows.jsonl)
#   sweep_step SWEEP WALL_S LOG RUN ARGS...    `attnbench sweep=SWEEP` into $OUT/RUN under a wall-clock cap,
#                                              its output in $OUT/LOG.txt, then fin RUN
fin() { python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/$1').finalize()" 2>/dev/null; }
sweep_step() {
  local sweep=$1 wall=$2 log=$3 run=$4; shift 4
  timeout -k 10 "$wall" python3 -m attnbench.cli sweep=$sweep device=cuda results_dir="$OUT" run_id=$run "$@" \
    > "$OUT/$log.txt" 2>&1
  echo "== $log: exit $? after ${SECONDS}s"; fin $run
}
