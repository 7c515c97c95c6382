# esmc_lens: `make demo` and `make test` set everything up on a fresh machine (Python 3.10+
# and access to PyPI) and are no-ops to re-install when nothing changed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install only when the dependency spec changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
export ESMC_DATA ?= $(if $(wildcard ../shared/data/esmc),$(abspath ../shared/data/esmc))
NB_TIMEOUT ?= 1200
# Torch threads per notebook kernel. One: on a small CPU shared with other jobs, OpenMP
# threads waiting on each other cost 3-8x in wall time (captures, generation, the head).
NB_THREADS ?= 1
# `make test` also executes every notebook (quick mode) in CI (CI=true), or with NB_IN_TEST=1.
NB_IN_TEST ?= $(if $(filter true 1,$(CI)),1,0)
# Every notebook, headlessly, in quick mode (a smoke run: see notebooks/README.md).
NB_RUN = ESMC_QUICK=1 MPLBACKEND=Agg OMP_NUM_THREADS=$(NB_THREADS) $(BIN)/python -m pytest -q \
	-p no:cacheprovider --nbmake --nbmake-timeout=$(NB_TIMEOUT) --durations=0 notebooks
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast notebooks lint bench clean

install: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/python -m pip install -q -e '.[dev,notebooks]' -c constraints.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: install
	$(BIN)/esmc-lens demo

# The notebooks run even when the suite fails (CI reports both); either failing fails.
test: install
	@status=0; set -x; $(BIN)/python -m pytest -q $(PYTEST_ARGS) || status=1; { set +x; } 2>/dev/null; \
	if [ "$(NB_IN_TEST)" = 1 ]; then set -x; $(NB_RUN) || status=1; \
	else echo "make test: notebooks not executed (CI is not true): run 'make notebooks'"; fi; \
	exit $$status

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

notebooks: install
	$(NB_RUN)

lint: install
	$(BIN)/ruff check esmc_lens tests

clean:
	rm -rf $(VENV) .pytest_cache outputs
