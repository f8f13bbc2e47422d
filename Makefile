# Two commands for a newcomer: `make run` (the whole portal) and `make test` (the whole suite).
# Both create .venv/ and install the pinned requirements.lock the first time; a stamp file makes
# later runs skip installation until requirements.lock or pyproject.toml change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 5000
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint bench bench-scale lock migrate clean-instance system-deps

help:
	@echo "make run [PORT=5000]   start Redis, the Celery worker and the web server (Ctrl-C stops all)"
	@echo "make test              the whole suite, then its database tests on PostgreSQL (ruff first)"
	@echo "make lint              ruff check and ruff format --check only"
	@echo "make test-fast         the suite without the end-to-end tests"
	@echo "make bench             pipeline throughput and latency vs the model alone (bench-out/pipeline.json), similar-case search at 100,000 cases (bench-out/similar.json)"
	@echo "make bench-scale       a folder of 10,000 images through a portal started as make run starts it (bench-out/scale.json; SCALE_ARGS=\"--images 500\")"
	@echo "make lock              re-pin requirements.lock from what is installed in .venv"
	@echo "make migrate           apply database migrations to instance/portal.db (or DATABASE_URL)"

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...).")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.lock pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.lock
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) scripts/run_portal.py --port $(PORT)

# System packages the tests need (PostgreSQL for the database tests); quick when already installed.
system-deps:
	sh scripts/install_system_deps.sh

# Lint and format checks first: a style violation fails the suite like a failing test.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Then the tests that use the app's database once more on PostgreSQL (--database, tests/conftest.py):
# the rest of that pass is deselected. With CI=true a missing PostgreSQL or Chromium fails the run.
test: $(STAMP) system-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest -m "not e2e" --database=postgresql $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

migrate: $(STAMP)
	$(VENV)/bin/flask --app webapp db upgrade

# Starts its own redis-server, Celery worker and gunicorn on free ports; not part of the tests.
bench: $(STAMP)
	$(PY) scripts/bench_pipeline.py $(BENCH_ARGS)
	$(PY) scripts/bench_similar.py

# The portal as `make run` starts it, on free ports with a temporary instance; at most ~45 minutes.
bench-scale: $(STAMP)
	$(PY) scripts/bench_scale.py $(SCALE_ARGS)

# Pins exactly what is installed (pip, and the editable project itself, left out).
lock:
	@echo "# Pinned by 'make lock' (pip freeze of .venv; Linux x86_64, Python 3.11). Install: make install" > requirements.lock
	$(PY) -m pip freeze --all --exclude-editable --disable-pip-version-check | grep -v -E '^(pip|dermportal)==' >> requirements.lock
	$(PY) scripts/lock_web.py

clean-instance:
	rm -rf instance/
