# Two commands on a fresh machine: `make bench` and `make test`. Both create .venv and install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch: keep a torch that is already there (the GPU image's 2.11); otherwise take the CPU build, so that no
# plain requirement pulls a multi-GB CUDA build onto a CPU machine.
TORCH_CPU ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=

.PHONY: bench test install clean report lint help

help:
	@echo "make bench   # create .venv, install, run the default sweep (GPU sweep with a GPU, else the CPU smoke sweep)"
	@echo "make test    # create .venv, install, run the test suite"

$(STAMP): pyproject.toml Makefile
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PY) -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 11))" 2>/dev/null; then \
	    echo "using the system torch"; $(PY) -m venv --system-site-packages $(VENV); \
	  else $(PY) -m venv $(VENV); fi; \
	fi
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(BIN)/python -c 'import torch; print(torch.__version__)') already present"; \
	else \
	  $(BIN)/python -m pip install -q "$(TORCH_CPU)" || \
	  $(BIN)/python -m pip install -q "$(TORCH_CPU)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/attnbench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
