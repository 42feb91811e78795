#!/usr/bin/env bash
# The 2-GPU context-parallel sweep (conf/sweep/cp.yaml), for the nvidia-h200-x2 kind. Four steps, one run
# folder ($OUT/results/h200x2-cp, also as $OUT/cp.tgz); each step under its own time limit so the whole
# call stays under 8 minutes (a step cut short keeps its finished rows; the same command again resumes).
#   1 single-device rows: full and causal at 32K, 64K, 128K (the speed-up baseline)
#   2 weak scaling, 32K tokens per GPU: 64K full (contiguous) and causal (zigzag, contiguous), every layout
#   3 strong scaling: 128K full, every layout
#   4 a 512K causal row (zigzag, heads_q=8), every layout
#   5 with the time left: pytest -m gpu tests/test_cp_gpu.py (CUDA chunk kernels vs the math kernel; every
#     layout on a 2-GPU NCCL gang)
# Carry the wheels first:  mkdir -p .whl && cp ../shared/device/wheels/*.whl .whl/
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ! python3 -c "import hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# attnbench without pip: a package folder of symlinks (attnbench -> bench/, attnbench.masks -> masks/, ...)
PKG=/tmp/attnbench-pkg
rm -rf "$PKG" && mkdir -p "$PKG/attnbench"
for f in bench/*; do ln -s "$PWD/$f" "$PKG/attnbench/"; done
for d in masks methods tasks conf; do ln -s "$PWD/$d" "$PKG/attnbench/$d"; done
export PYTHONPATH=$PKG:/tmp/site:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}
R=$OUT/results
RUN=h200x2-cp
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpus.txt" 2>&1
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
# each invocation under its own limit; an invocation cut short keeps its finished rows (rows.jsonl)
ab() { local limit=$1; shift; timeout "$limit" python3 -m attnbench.cli sweep=cp device=auto results_dir="$R" run_id=$RUN "$@"; }
CP=(layouts=[ring,ring_allgather,ulysses,usp,torch_cp] calibrate=false)
start=$SECONDS
ab 80 layouts=[single] seq_lens=[32768,65536,131072] > "$OUT/step1.txt" 2>&1
{ ab 70 "${CP[@]}" masks=[full] cp_balance=[contiguous] seq_lens=[65536]
  ab 90 "${CP[@]}" masks=[causal] cp_balance=[zigzag,contiguous] seq_lens=[65536]; } > "$OUT/step2.txt" 2>&1
ab 90 "${CP[@]}" masks=[full] cp_balance=[contiguous] seq_lens=[131072] > "$OUT/step3.txt" 2>&1
left=$(( 465 - (SECONDS - start) ))
if [ $left -gt 30 ]; then
  ab $left "${CP[@]}" masks=[causal] cp_balance=[zigzag] seq_lens=[524288] heads_q=8 > "$OUT/step4.txt" 2>&1
fi
left=$(( 470 - (SECONDS - start) ))
if [ $left -gt 60 ]; then  # what time is left: the GPU tests of the CP kernels and layouts
  timeout $left python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_cp_gpu.py > "$OUT/gpu-tests.txt" 2>&1
fi
python3 -c "from attnbench.record.store import RowStore; RowStore('$R/$RUN').finalize()"
python3 - "$R/$RUN" <<'PY' > "$OUT/summary.txt" 2>&1
import sys, pandas as pd
f = pd.read_parquet(sys.argv[1] + "/rows.parquet")
cols = ["mask", "seq_q", "heads_q", "layout", "world_size", "status", "ms_median", "ms_rank_max", "imbalance",
        "comm_bytes", "speedup", "efficiency", "rel_err", "err_tol", "peak_mem_mb", "flags", "reason"]
pd.set_option("display.width", 250); pd.set_option("display.max_colwidth", 120); pd.set_option("display.max_rows", 200)
print(f.sort_values(["mask", "seq_q", "layout"])[cols].to_string())
PY
tar czf "$OUT/cp.tgz" -C "$R" "$RUN"
echo "elapsed $((SECONDS - start)) s"; tail -n 60 "$OUT/summary.txt"; tail -n 3 "$OUT"/step*.txt
