# Two commands on a fresh machine: `make bench` and `make test`. Both create .venv and install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch (scripts/torch_choice.sh): keep a torch that is already there (the GPU image's 2.11); else, with an
# NVIDIA GPU (nvidia-smi lists one), the CUDA build from the default index; else the CPU build (the +cpu
# local version, from the configured indexes, then the PyTorch CPU index).
TORCH_CUDA ?= torch>=2.11
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=
# `make test` runs the suite on TEST_WORKERS processes (pytest-xdist, from the test extra; CI has 2 cores);
# TEST_WORKERS=0 runs it in one process (needed for --benchmark-enable: pytest-benchmark does not time under
# xdist). worksteal: idle workers take queued tests from busy ones, so the few 10-20 s tests do not end the run
# on one worker.
TEST_WORKERS ?= 2
TEST_DIST ?= worksteal

.PHONY: bench test install clean report lint help device-wheel

help:
	@echo "make bench   # create .venv, install, run the default sweep (GPU sweep with a GPU, else the CPU smoke sweep)"
	@echo "make test    # create .venv, install, run the test suite"

$(STAMP): pyproject.toml Makefile scripts/torch_choice.sh
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PY) -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 11))" 2>/dev/null; then \
	    echo "using the system torch"; $(PY) -m venv --system-site-packages $(VENV); \
	  else $(PY) -m venv $(VENV); fi; \
	fi
	TORCH_CUDA="$(TORCH_CUDA)" TORCH_CPU="$(TORCH_CPU)" TORCH_CPU_INDEX="$(TORCH_CPU_INDEX)" \
	  bash scripts/torch_choice.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/attnbench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist $(TEST_DIST) $(ARGS)

# the lent GPU machine installs attnbench from a wheel carried in .whl/ (git-ignored; the device scripts say
# which other wheels to copy there), with the commit it was built from (rows' git_sha; scripts/device_wrap.sh)
device-wheel: $(STAMP)
	mkdir -p .whl && rm -f .whl/attnbench-*.whl
	$(BIN)/python -m pip wheel -q --no-deps -w .whl .
	git rev-parse HEAD > .whl/GIT_SHA

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
