# Two commands are all a fresh machine needs: `make run` and `make test`.
# Each builds .venv from a hashed lock on first use (tutorial/maintenance/venv.sh): `make run` installs only
# the service and what running a chapter needs; test, docs, bench and lint add the rest.

SHELL   := bash
.SHELLFLAGS := -o pipefail -c
# Named on the command line or in the environment, PYTHON must be the one .venv
# was made with (read before the default below gives it one).
EXPLICIT := $(if $(filter undefined,$(origin PYTHON)),0,1)
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
CHAPTER ?=
PORT    ?= 8080
DIR     ?=
SETUP   ?=
ARGS    ?=
# One xdist worker more than cores: a part of the suite waits on timeouts (a
# database that never answers, a drain) and leaves its core idle meanwhile.
JOBS    ?= $(shell $(PYTHON) -c 'import os; print(os.cpu_count() + 1)' 2>/dev/null || echo auto)
EVERY_CHAPTER ?=
RUNS    ?= 3
MIGRATE ?=
export PORT
VENV_RUN := @bash tutorial/maintenance/venv.sh '$(PYTHON)' $(EXPLICIT) run
VENV_DEV := @bash tutorial/maintenance/venv.sh '$(PYTHON)' $(EXPLICIT) dev
# Material for MkDocs prints a notice about its future in every build; MAINTAINING.md records it.
export NO_MKDOCS_2_WARNING := 1

.PHONY: help run migrate test soak check docs bench fleet rollout lint pins freshness clean

help:
	@echo "make run   [CHAPTER=NN] [PORT=8080]   run a chapter (default: the last) against a local PostgreSQL"
	@echo "make test  [ARGS='tests/test_01_minimal_app.py -x'] [JOBS=1] [EVERY_CHAPTER=1]  every test (or ARGS), on cores + 1 workers"
	@echo "make soak  [RUNS=3]                   the whole suite RUNS times, shuffled; lists every test that failed"
	@echo "make check CHAPTER=NN DIR=path        run chapter NN's tests against your own folder"
	@echo "make docs                             serve the tutorial site on http://localhost:8000"
	@echo "make bench                            measure the service (see bench/README.md)"
	@echo "make fleet  [CHAPTER=07] [PORT=8080]  a chapter from 07 on as a fleet: PostgreSQL, PgBouncer, replicas, HAProxy"
	@echo "make rollout [SETUP=article] [CHAPTER=07]  a rolling deploy under load: of a running make fleet, or of its own"
	@echo "make rollout CHAPTER=09 MIGRATE=1     a deploy with its migration: chapter 08's fleet, migrate, then roll"
	@echo "make migrate [CHAPTER=09]             a chapter's migrations, once, against DATABASE_URL or make run's database"
	@echo "make lint                             ruff, and squawk over every chapter's migrations"
	@echo "make pins [UPGRADE=1]                 rewrite the hashed locks from requirements*.txt"
	@echo "make freshness                        the suite against the newest aiohttp, asyncpg, gunicorn, uvloop"
	@echo "Any of them takes PYTHON=python3.12 to build .venv with another Python (3.11 to 3.13)."

run:
	$(VENV_RUN)
	@$(PY) -m tutorial.learner.run $(CHAPTER)

migrate:
	$(VENV_RUN)
	@$(PY) -m tutorial.learner.run --migrate $(CHAPTER)

# pytest's own temp root (/tmp/pytest-of-$USER) is reset to 0700 by any pytest run on the machine,
# and PostgreSQL runs as another user inside it: each run gets a folder of its own, removed after.
test:
	$(VENV_DEV)
	@tmp=$$(mktemp -d -t aiohttp-tutorial-XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	  $(if $(EVERY_CHAPTER),TUTORIAL_EVERY_CHAPTER=1) $(PY) -m pytest -n $(JOBS) --dist loadgroup --no-loadscope-reorder \
	  --basetemp="$$tmp/pytest" $(ARGS)

soak:
	$(VENV_DEV)
	@$(PY) -m tutorial.maintenance.soak --runs $(RUNS) --jobs $(JOBS) $(if $(ARGS),-- $(ARGS))

check:
	$(VENV_DEV)
	@$(PY) -m tutorial.learner.check $(CHAPTER) $(DIR)

docs:
	$(VENV_DEV)
	@$(PY) -m mkdocs serve --dev-addr 127.0.0.1:8000

bench:
	$(VENV_DEV)
	@$(PY) -m bench

fleet:
	$(VENV_DEV)
	@$(PY) -m tutorial.fleet $(CHAPTER)

rollout:
	$(VENV_DEV)
	@$(PY) -m tutorial.fleet.rollout $(if $(SETUP),--setup $(SETUP)) $(if $(CHAPTER),--chapter $(CHAPTER)) $(if $(MIGRATE),--migrate)

lint:
	$(VENV_DEV)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(PY) -m tutorial.maintenance.squawk

# The dev lock first; the other two are constrained by it, so a pin has one version in all three.
# Without UPGRADE=1 every pin already in a lock is kept: the locks change only where a
# requirements file did. UPGRADE=1 moves every unpinned (transitive) package to its newest release.
LOCK = $(VENV)/bin/uv pip compile --quiet --universal --generate-hashes \
       --custom-compile-command "make pins" $(if $(UPGRADE),--upgrade)
pins:
	$(VENV_DEV)
	@$(LOCK) --python-version 3.11.5 requirements-dev.txt -o requirements-dev.lock
	@$(LOCK) --python-version 3.11 -c requirements-dev.lock requirements-run.txt -o requirements-run.lock
	@$(LOCK) --python-version 3.11 -c requirements-dev.lock requirements.txt -o requirements.lock
	@git diff --stat -- 'requirements*.lock' 2>/dev/null || true

freshness:
	$(VENV_DEV)
	@$(PY) -m tutorial.maintenance.freshness

clean:
	rm -rf $(VENV) .data site .pytest_cache
