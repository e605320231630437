# lmforge — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmforge-installed
# Where pip has no CPU build of torch (this machine has one locally), e.g.
#   make setup PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
PIP_TORCH_ARGS ?=
# Everything the project caches lives in ignored folders inside the checkout.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "lmforge needs Python >= 3.10, found " + sys.version' 
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: 2.13.0 is a CPU build available offline here; a floating torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q $(PIP_TORCH_ARGS) "torch==2.13.0"
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

# The suite runs on the CPU (gloo) by design, also on a GPU machine: it asks for the CPU by name.
test: setup
	DS_ACCELERATOR=cpu LMFORGE_ACCELERATOR=cpu $(PY) -m pytest -q --durations=25 tests $(PYTEST_ARGS)

demo: setup
	$(PY) -m demo

# All benchmarks, then bench/REPORT.md; `make bench BENCH_ARGS=--quick` for a smoke run, `--only NAME` for one.
bench: setup
	$(PY) -m pip install -q -c $(VENV)/constraints.txt "matplotlib>=3.7"  # bench/transfer.py's plot only
	$(PY) -m bench $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf out runs .cache/torch_extensions
