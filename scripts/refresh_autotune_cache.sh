#!/usr/bin/env bash
# Fold a device call's tuned Triton configs ($OUT/triton-autotune.tgz, from scripts/device_wrap.sh or
# device_task_grid.sh) into .triton-cache and into the committed scripts/device-cache/triton-autotune.tgz, which
# those scripts unpack on the device, so fla's autotuning (60-110 s on the H200) runs once per kernel version,
# not once per session. Only *.autotune.json files (a few KB); kernels recompile in seconds.
#   bash scripts/refresh_autotune_cache.sh /work/.device/4 [more folders ...]
set -eu
mkdir -p .triton-cache scripts/device-cache
[ -f scripts/device-cache/triton-autotune.tgz ] && tar xzf scripts/device-cache/triton-autotune.tgz -C .triton-cache --skip-old-files
for folder in "$@"; do
  tar xzf "$folder/triton-autotune.tgz" -C .triton-cache
done
( cd .triton-cache && find . -name '*.autotune.json' -print0 | sort -z \
  | tar --sort=name --mtime=2026-01-01 --owner=0 --group=0 -czf ../scripts/device-cache/triton-autotune.tgz --null -T - )
echo "scripts/device-cache/triton-autotune.tgz: $(tar tzf scripts/device-cache/triton-autotune.tgz | wc -l) tuned kernels"
