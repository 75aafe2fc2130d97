# The two commands (see README):
#   make repro   set up, then run the pipeline (dvc repro)
#   make test    set up, then run the test suite
#   make smoke   the CI retraining smoke on the mirror (.ci/smoke.py)
# Set DATA_MIRROR=../shared/datasets (or any mirror) to download offline.

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test smoke bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -n auto --maxprocesses 4

smoke: setup
	$(BIN)/python .ci/smoke.py

bench: setup
	$(BIN)/python benchmarks/bench_prepare.py
