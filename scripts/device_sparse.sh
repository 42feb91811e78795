#!/usr/bin/env bash
# One call on the 1-GPU kind (nvidia-h200): the routed/sparse/local methods of issue 9 beside cuDNN and
# FlexAttention, as one run ($OUT/h200-sparse) in four trimmed invocations of sweep=sparse, then the GPU
# tests and the summary. Aimed at <= ~6 minutes of GPU time; each invocation has a wall-clock cap (the
# harness resumes, so a cut invocation keeps its finished rows) and every case case_timeout_s (preset: 90 s).
# Expected: ~20 s install, invocations capped at 160 + 100 + 60 + 40 s, one GPU test (~15 s).
# Before the call: mkdir -p .whl && cp ../shared/device/wheels/*.whl .whl/   (.whl is git-ignored; carry it)
# Afterwards: copy $OUT/h200-sparse into results/, `attnbench report results/h200-sparse`.
set -u
OUT=${OUT:-$PWD/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}  # attnbench itself is a wheel in .whl/ (pip wheel --no-deps -w .whl .)
python3 -c "import attnbench" || { echo "attnbench wheel missing from .whl/"; exit 1; }
export PYTHONUNBUFFERED=1
# Triton autotuning results are cached on disk (triton >= 3.2 knob): a Triton method (fla-core's kernels autotune
# per process: 60-94 s first calls on the H200, h200-linear/device-logs) tunes once per machine, not once per worker.
export TRITON_CACHE_AUTOTUNING=1
RUN=h200-sparse
ONE_D="sdpa_cudnn,flex,biformer,halo,routing,combiner_fixed,combiner_axial,combiner_logsparse,sparsifiner,probsparse,long_short,superlinear"

sweep() {  # sweep WALL_S LOG ARGS...: one invocation of the run, capped, rows finalized even when cut
  local wall=$1 log=$2; shift 2
  timeout -k 10 "$wall" python3 -m attnbench.cli sweep=sparse device=cuda results_dir="$OUT" run_id=$RUN "$@" \
    > "$OUT/$log.txt" 2>&1
  echo "== $log: exit $? after ${SECONDS}s"
  python3 -c "from attnbench.record.store import RowStore; RowStore('$OUT/$RUN').finalize()" 2>/dev/null
}

# 1. GPU smoke of every method at 4K: full and causal, fwd and fwd_bwd (gradients gated in full at 4K)
sweep 160 smoke-4k seq_lens=[4096]
# 2. 16K and 64K, fwd and fwd_bwd: the 1-D methods and the baselines
sweep 100 mid "seq_lens=[16384,65536]" "methods=[$ONE_D]"
# 3. 256K, forward: every 1-D method whose work is sub-quadratic, and cuDNN
sweep 60 256k "seq_lens=[262144]" "modes=[fwd]" \
  "methods=[sdpa_cudnn,biformer,halo,routing,combiner_fixed,combiner_axial,combiner_logsparse,probsparse,long_short,superlinear]"
# 4. 1M, forward: the gather-dense and plain-PyTorch fast paths
sweep 40 1m "seq_lens=[1048576]" "modes=[fwd]" "methods=[biformer,halo,routing,combiner_logsparse,probsparse]"

# 5. optional (SUPERLINEAR_PKG=1): the superlinear package as a backend (superlinear_pkg, causal only, same operator
#    as superlinear, gated on its reference) in its own run $OUT/h200-superlinear-pkg, 4K-64K, fwd and fwd_bwd,
#    plus its GPU tests. Its wheel is shared/device/wheels/superlinear-0.1.0-py3-none-any.whl: the `cp` above
#    copies it into .whl/ with the others (it needs triton, already on the machine; it also installs a top-level
#    `apps` package, unused). Without the wheel the method is listed unavailable and its rows are `unsupported`.
if [ "${SUPERLINEAR_PKG:-}" = 1 ]; then
  timeout -k 10 90 python3 -m attnbench.cli sweep=sparse device=cuda results_dir="$OUT" run_id=h200-superlinear-pkg \
    "methods=[superlinear_pkg,superlinear]" "masks=[causal]" "seq_lens=[4096,16384,65536]" > "$OUT/superlinear-pkg.txt" 2>&1
  echo "== superlinear-pkg: exit $? after ${SECONDS}s"
  timeout -k 5 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_superlinear_pkg.py > "$OUT/gpu-tests-pkg.txt" 2>&1
  tail -n 3 "$OUT/gpu-tests-pkg.txt"
fi

# GPU test of the data-dependent BlockMask path (no recompilation on new inputs); the whole GPU test file
# (every method against its reference at 1K, bf16) with GPU_TESTS=all - the 4K smoke above gates the same
# fast paths through the same case runner
SELECT="-k superlinear_block_masks"; [ "${GPU_TESTS:-}" = all ] && SELECT=""
timeout -k 5 120 python3 -m pytest -m gpu -q -p no:cacheprovider $SELECT tests/test_sparse_gpu.py > "$OUT/gpu-tests.txt" 2>&1
python3 scripts/sparse_summary.py "$OUT/$RUN" > "$OUT/summary.md" 2>&1
tail -n 3 "$OUT/gpu-tests.txt"; cat "$OUT/summary.md" | head -n 60
grep -h "not ok\|cases:" "$OUT"/smoke-4k.txt "$OUT"/mid.txt "$OUT"/256k.txt "$OUT"/1m.txt | grep -v "case/s" | tail -n 20
