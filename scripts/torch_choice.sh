#!/usr/bin/env bash
# Which torch build `make install` puts into the venv, and the install itself (the Makefile calls this).
#
#   scripts/torch_choice.sh PYTHON
#
# 1. PYTHON already imports torch (the venv has one, or sees the system's >= 2.11 through
#    --system-site-packages): keep it, install nothing.
# 2. else, an NVIDIA GPU is present (`nvidia-smi -L` succeeds and lists a GPU): the CUDA build,
#    `PYTHON -m pip install "$TORCH_CUDA"` (default torch>=2.11) from the default index, which serves CUDA
#    builds of torch on Linux x86_64.
# 3. else the CPU build: `PYTHON -m pip install "$TORCH_CPU"` (default torch==2.13.0+cpu: the +cpu local
#    version can only be satisfied by a CPU build) from the configured indexes; if they have no such wheel
#    (PyPI has none), from the PyTorch CPU index, `--index-url $TORCH_CPU_INDEX`.
# The first line printed says which branch was taken and why.
set -u

PYTHON=${1:?usage: scripts/torch_choice.sh PYTHON}
TORCH_CUDA=${TORCH_CUDA:-torch>=2.11}
TORCH_CPU=${TORCH_CPU:-torch==2.13.0+cpu}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

gpu_present() {
  command -v nvidia-smi >/dev/null 2>&1 || return 1
  nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "torch: keep the torch already present ($("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
  exit 0
fi

if gpu_present; then
  echo "torch: NVIDIA GPU found (nvidia-smi -L), no torch: installing the CUDA build: pip install '$TORCH_CUDA'"
  exec "$PYTHON" -m pip install -q "$TORCH_CUDA"
fi

echo "torch: no NVIDIA GPU (nvidia-smi missing or lists none), no torch: installing the CPU build '$TORCH_CPU'"
"$PYTHON" -m pip install -q "$TORCH_CPU" && exit 0
echo "torch: '$TORCH_CPU' not on the configured indexes; trying the PyTorch CPU index $TORCH_CPU_INDEX"
exec "$PYTHON" -m pip install -q "$TORCH_CPU" --index-url "$TORCH_CPU_INDEX"
