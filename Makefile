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
# Every notebook, headlessly, in quick mode (a smoke run: see notebooks/README.md), executed
# by nbclient in tests/test_notebooks.py: each figure cell must show its figure inline; the
# executed copies (with outputs) go to $(NB_EXECUTED) for `make docs`.
NB_EXECUTED ?= outputs/executed
NB_RUN = ESMC_QUICK=1 ESMC_NB_EXECUTE=1 ESMC_NB_EXECUTED=$(abspath $(NB_EXECUTED)) \
	ESMC_NB_TIMEOUT=$(NB_TIMEOUT) OMP_NUM_THREADS=$(NB_THREADS) $(BIN)/python -m pytest -q \
	-p no:cacheprovider -m notebooks --durations=0 tests/test_notebooks.py
# The static site: API reference (pdoc) + the executed notebooks; then Chromium opens it.
SITE ?= site
DOCS_RUN = $(BIN)/python docs/build_site.py --executed $(NB_EXECUTED) --out $(SITE)
DOCS_CHECK = ESMC_DOCS_SITE=$(abspath $(SITE)) $(BIN)/python -m pytest -q -p no:cacheprovider \
	-m docs tests/test_notebooks.py
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast notebooks docs lint bench clean

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

# The notebooks and the docs run even when the suite fails (CI reports all); any failing fails.
test: install
	@status=0; set -x; $(BIN)/python -m pytest -q $(PYTEST_ARGS) || status=1; { set +x; } 2>/dev/null; \
	if [ "$(NB_IN_TEST)" = 1 ]; then set -x; $(NB_RUN) || status=1; \
	{ $(DOCS_RUN) && $(DOCS_CHECK); } || status=1; { set +x; } 2>/dev/null; \
	else echo "make test: notebooks and docs not built (CI is not true): run 'make docs'"; fi; \
	exit $$status

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

notebooks: install
	$(NB_RUN)

# Executes the notebooks first when their executed copies are missing or stale.
docs: install
	@$(BIN)/python docs/build_site.py --executed $(NB_EXECUTED) --check || $(NB_RUN)
	$(DOCS_RUN)

lint: install
	$(BIN)/ruff check esmc_lens tests

clean:
	rm -rf $(VENV) .pytest_cache outputs $(SITE)
