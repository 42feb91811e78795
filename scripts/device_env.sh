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
