# Two commands are all a fresh machine needs: `make run` and `make test`.
# Both build .venv from the pinned requirements on first use, and again whenever those files change.

SHELL   := bash
.SHELLFLAGS := -o pipefail -c
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
CHAPTER ?=
PORT    ?= 8080
DIR     ?=
SETUP   ?=
export PORT

.PHONY: help run test check docs bench fleet rollout clean

help:
	@echo "make run   [CHAPTER=NN] [PORT=8080]   run a chapter (default: the last) against a local PostgreSQL"
	@echo "make test                             run every test"
	@echo "make check CHAPTER=NN DIR=path        run chapter NN's tests against your own folder"
	@echo "make docs                             serve the tutorial site on http://localhost:8000"
	@echo "make bench                            measure the service (see bench/README.md)"
	@echo "make fleet  [PORT=8080]               chapter 07 as a fleet: PostgreSQL, PgBouncer, replicas, HAProxy"
	@echo "make rollout [SETUP=article]          a rolling deploy under load: of a running make fleet, or of its own"

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "Python 3.10 or newer is needed; $(PYTHON) is $$($(PYTHON) --version 2>&1)." >&2; exit 1; }
	@test -x $(PY) || { echo "==> creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> installing pinned requirements into $(VENV) (the first time takes a minute)"
	@$(PY) -m pip install --disable-pip-version-check -r requirements-dev.txt 2>&1 | tee $(VENV)/pip.log \
	  | { grep --line-buffered -E '^(Collecting|Successfully installed)' | sed -u 's/^/    /' || true; } \
	  || { echo "pip failed; the last lines of $(VENV)/pip.log:" >&2; tail -n 15 $(VENV)/pip.log >&2; exit 1; }
	@touch $(STAMP)
	@echo "==> $(VENV) is ready"

run: $(STAMP)
	@$(PY) -m tutorial.run $(CHAPTER)

test: $(STAMP)
	@$(PY) -m pytest

check: $(STAMP)
	@$(PY) -m tutorial.check $(CHAPTER) $(DIR)

docs: $(STAMP)
	@$(PY) -m mkdocs serve --dev-addr 127.0.0.1:8000

bench: $(STAMP)
	@$(PY) -m bench

fleet: $(STAMP)
	@$(PY) -m tutorial.fleet

rollout: $(STAMP)
	@$(PY) -m tutorial.rollout $(if $(SETUP),--setup $(SETUP))

clean:
	rm -rf $(VENV) .data site .pytest_cache
