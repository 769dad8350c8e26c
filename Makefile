# driftloop: `make demo` and `make test` work on a fresh machine.
# The virtual environment is built from requirements/lock.txt and rebuilt only when the
# lock (or pyproject.toml) changes: its stamp file is named by their hash.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
LOCK := requirements/lock.txt
LOCK_HASH := $(shell cat $(LOCK) pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
UV_VERSION := 0.13.8
BIN := $(VENV)/bin

export NML_DISABLE_USAGE_LOGGING := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv demo test test-fast lock postgres-bin lint clean

venv: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@echo ">> building $(VENV) from $(LOCK)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --python $(BIN)/python $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

# Re-resolve the lock after changing dependencies in pyproject.toml.
lock: venv
	$(BIN)/uv pip compile pyproject.toml --extra train --extra monitor --extra dev \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	  --quiet -o $(LOCK)

demo: venv
	$(BIN)/driftloop demo

# PostgreSQL server binaries for the registry tests (Debian's package; CI runs as root).
postgres-bin:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo ">> installing PostgreSQL (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

test: venv postgres-bin
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Unit tests only: no Prefect server, no PostgreSQL.
test-fast: venv
	$(BIN)/python -m pytest -q -m "not postgres and not prefect" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check driftloop flows tasks blocks tests

clean:
	rm -rf $(VENV) .driftloop .pytest_cache
