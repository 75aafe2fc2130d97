# The commands (see README):
#   make repro          set up, then run the pipeline (dvc repro), data from the official hosts
#                       (or from DATA_MIRROR, a mirror of them)
#   make test           set up, then run the test suite
#   make repro-offline  the pipeline on the offline dataset mirror (DATA_MIRROR, default
#                       ../shared/datasets), CIFAR-10 from the JPEG copy the mirror holds
#   make smoke          the CI retraining smoke on the mirror (.ci/smoke.py)
#   make team-server    the team tracking server (python -m cluster.team_server): PostgreSQL in
#                       $(TEAM)/postgres, artifacts in $(TEAM)/artifacts, http://127.0.0.1:5000
#   make bench          the prepare benchmark on the mirror (python -m benchmarks.bench_prepare;
#                       the other benchmarks: python -m benchmarks.<name>)

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

# The UI tests drive a real Chromium: Debian's package, installed here when
# missing (CHROMIUM=/path/to/chrome uses another and skips the install).
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# The team-server tests start a real PostgreSQL: Debian's package, installed
# here when its programs are missing (PG_BIN=/path/to/bin uses others).
PG_CTL ?= $(or $(wildcard $(PG_BIN)/pg_ctl),$(lastword $(sort $(wildcard /usr/lib/postgresql/*/bin/pg_ctl))),$(shell command -v pg_ctl))

.PHONY: setup browser postgres repro repro-offline test smoke bench team-server

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

postgres:
ifeq ($(strip $(PG_CTL)),)
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null
endif

repro: setup
	$(BIN)/dvc repro

# The mirror has CIFAR-10 only as its JPEG copy (cifar10_jpeg), not the official
# archive params.yaml names: dvc exp run -S selects the copy, and leaves
# params.yaml saying so, like dvc.lock (git checkout params.yaml to go back).
OFFLINE_MIRROR = $(or $(DATA_MIRROR),../shared/datasets)
repro-offline: setup
	DATA_MIRROR=$(OFFLINE_MIRROR) $(BIN)/dvc exp run -S datasets.cifar10.source.builtin=cifar10_jpeg

test: setup browser postgres
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --maxschedchunk 1

smoke: setup browser postgres
	$(BIN)/python .ci/smoke.py

bench: setup
	$(BIN)/python -m benchmarks.bench_prepare

# TEAM_SERVER_ARGS adds options (--host 0.0.0.0, --auth, --workers N: python -m
# cluster.team_server --help). As root, PostgreSQL runs as the postgres user,
# which must pass through every parent folder of $(TEAM) (chmod o+x); where it
# cannot (a project under /root), TEAM=/var/lib/imagepipe-team.
TEAM ?= .team
team-server: setup postgres
	$(BIN)/python -m cluster.team_server --postgres $(TEAM)/postgres --artifacts-destination $(TEAM)/artifacts \
		$(TEAM_SERVER_ARGS)
