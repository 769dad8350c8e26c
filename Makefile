# driftloop: `make demo` and `make test` work on a fresh machine.
# The virtual environment is built from requirements/lock.txt and rebuilt only when the
# lock (or pyproject.toml, or how it is built: VENV_RECIPE) changes: its stamp file is
# named by their hash.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
LOCK := requirements/lock.txt
# Bytecode is compiled at install: with PYTHONDONTWRITEBYTECODE set (as on CI machines)
# Python would otherwise recompile every imported module in every process, which made
# each flow run, worker and CLI call spend 2-5 s of CPU importing Prefect, NannyML and
# the boosters.
VENV_RECIPE := compile-bytecode
LOCK_HASH := $(shell (cat $(LOCK) pyproject.toml; echo $(VENV_RECIPE)) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
UV_VERSION := 0.13.8
BIN := $(VENV)/bin

export NML_DISABLE_USAGE_LOGGING := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv bytecode demo demo-stop test test-fast lock postgres-bin chromium-bin lint clean server worker pools deploy

venv: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@echo ">> building $(VENV) from $(LOCK)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

# The project's own bytecode, refreshed before tests and the demo (about a second per
# process saved when PYTHONDONTWRITEBYTECODE keeps Python from caching it itself).
bytecode: venv
	@$(BIN)/python -m compileall -q driftloop flows tasks blocks >/dev/null

# Re-resolve the lock after changing dependencies in pyproject.toml.
lock: venv
	$(BIN)/uv pip compile pyproject.toml --extra train --extra monitor --extra scale --extra dev \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	  --quiet -o $(LOCK)

# The loop on a real Prefect server: deploy, workers, train -> score -> monitor, and
# the drift event's automated retrain. KEEP=1 leaves server and workers running (stop
# them with `make demo-stop`). With PREFECT_API_URL set the demo refuses a server that
# already holds driftloop's pools or deployments unless YES_THIS_SERVER=1.
demo: bytecode
	$(BIN)/driftloop demo --loop --trials 5 $(if $(KEEP),--keep-running,) $(if $(YES_THIS_SERVER),--yes-this-server,)

# Stop the server and workers of a `make demo KEEP=1`, by the pids it recorded.
demo-stop: venv
	$(BIN)/driftloop demo --stop

# PostgreSQL server binaries for the registry tests (Debian's package; CI runs as root).
postgres-bin:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo ">> installing PostgreSQL (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

# Chromium and its WebDriver for the browser test of the Prefect UI (Debian's packages;
# nothing is downloaded at test time).
chromium-bin:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo ">> installing Chromium and chromium-driver (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# Three pytest workers (pytest-xdist) on this 2-core machine: with two, the cores sat idle
# ~12% of the run (212 of 1,758 CPU-s, /proc/stat) while tests waited on flow runs starting,
# servers and CLI calls; a third fills those waits (a fresh clone: 13:50 -> 10:07). A test
# file stays on one worker, so its module fixtures (a trained model, a server of its own)
# are built once; each worker has its own Prefect server, PostgreSQL and S3 endpoint. The
# 25 slowest tests are printed every run.
PYTEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25

test: bytecode postgres-bin chromium-bin
	$(BIN)/ruff check driftloop flows tasks blocks tests bench
	$(PYTEST) $(PYTEST_ARGS)

# Unit tests only: no Prefect server, no PostgreSQL.
test-fast: bytecode
	$(PYTEST) -m "not postgres and not prefect and not e2e" $(PYTEST_ARGS)

# A local Prefect server on 127.0.0.1 with SQLite under .driftloop/ (PostgreSQL: set
# PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://user:pass@host/prefect first).
# The UI finds its API through /ui-settings, which follows PREFECT_UI_API_URL and the
# server port settings, not --port: set them, or a UI on another port cannot reach its API.
PORT ?= 4200
server: venv
	@mkdir -p .driftloop/prefect
	@echo ">> Prefect UI: http://127.0.0.1:$(PORT)  (export PREFECT_API_URL=http://127.0.0.1:$(PORT)/api)"
	PREFECT_HOME=$(CURDIR)/.driftloop/prefect PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$(PORT) \
	  PREFECT_UI_API_URL=http://127.0.0.1:$(PORT)/api \
	  $(BIN)/prefect server start --host 127.0.0.1 --port $(PORT) --analytics-off

# make worker POOL=cpu (or gpu, edge); needs PREFECT_API_URL.
POOL ?= cpu
worker: venv
	$(BIN)/prefect worker start --pool $(POOL)

pools: venv
	$(BIN)/driftloop infra apply

deploy: venv pools
	$(BIN)/prefect block register -m driftloop.blocks.driftloop_blocks
	DRIFTLOOP_PROJECT_DIR=$(CURDIR) $(BIN)/prefect --no-prompt deploy --all

lint: venv
	$(BIN)/ruff check driftloop flows tasks blocks tests bench

clean:
	rm -rf $(VENV) .driftloop .pytest_cache
