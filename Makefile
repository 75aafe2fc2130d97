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

# The UI tests drive a real Chromium: Debian's package, installed here when
# missing (CHROMIUM=/path/to/chrome uses another and skips the install).
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup browser repro test smoke bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

browser:
ifeq ($(strip $(CHROMIUM)),)
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null
endif

repro: setup
	$(BIN)/dvc repro

test: setup browser
	$(BIN)/python -m pytest -n auto --maxprocesses 4

smoke: setup browser
	$(BIN)/python .ci/smoke.py

bench: setup
	$(BIN)/python benchmarks/bench_prepare.py
