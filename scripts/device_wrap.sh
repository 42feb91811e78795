#!/usr/bin/env bash
# Run a device script with its outputs in a scratch folder, then pack them: the device tool returns at most 8 files
# two folders deep, so everything comes back as $OUT/<name>.tgz plus the script's console log.
#   bash scripts/device_wrap.sh NAME scripts/device_NAME.sh [pre-step script ...]
set -u
NAME=$1; shift
# the device copy has no .git: the commit the wheel was built from travels as .whl/GIT_SHA (written beside the
# wheel: `git rev-parse HEAD > .whl/GIT_SHA`), so rows carry git_sha (git_dirty stays empty: unknown there)
[ -f .whl/GIT_SHA ] && export ATTNBENCH_GIT_SHA=$(cat .whl/GIT_SHA)
REAL_OUT=${OUT:?}
# Triton's autotuning results travel between device calls (same GPU model, same Triton): carry .triton-cache
# (git-ignored; unpack the previous call's $OUT/triton-autotune.tgz into it) and the scripts' TRITON_CACHE_AUTOTUNING=1
# finds the tuned configs there instead of re-tuning fla's kernels (60-110 s a first call on the H200). Only the
# *.autotune.json files come back (kernels recompile in seconds); a row's compile_s then holds no tuning.
mkdir -p .triton-cache
export TRITON_CACHE_DIR=$PWD/.triton-cache
# the tuned configs committed in scripts/device-cache (a fresh checkout has no .triton-cache: it is git-ignored);
# files already carried win. Refresh the tarball after a call: scripts/refresh_autotune_cache.sh <files_at>
[ -f scripts/device-cache/triton-autotune.tgz ] && \
  tar xzf scripts/device-cache/triton-autotune.tgz -C "$TRITON_CACHE_DIR" --skip-old-files 2>/dev/null
SCRATCH=/tmp/out-$NAME
mkdir -p "$SCRATCH"
export SCRATCH
# a wall-clock cap for all the scripts together, so the packing below always runs inside the call's limit
timeout -k 5 "${WRAP_S:-540}" bash -c 'for script in "$@"; do OUT=$SCRATCH bash "$script"; done' _ "$@" \
  > "$REAL_OUT/$NAME-console.txt" 2>&1
tar -czf "$REAL_OUT/$NAME.tgz" -C "$SCRATCH" .
( cd .triton-cache && find . -name '*.autotune.json' -print0 | tar -czf "$REAL_OUT/triton-autotune.tgz" --null -T - ) 2>/dev/null
tail -n 60 "$REAL_OUT/$NAME-console.txt"
